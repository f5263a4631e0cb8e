"""The recipe search of issue 14: which training recipe makes the best Cláudio on SmolLM2-135M?

Each recipe is a variant of ``examples/claudio`` (dataset, training prompt, inference prompt)
and of ``TrainConfig``. A run trains it, exports the GGUF, and judges **the GGUF** in llama.cpp,
as a user would run it: the calibrated rubric (3 answers per question: mean ± noise) and the
held-out probes (``probes.yaml``, one greedy answer each). Never the loss.

    python experiments/recipes.py baseline matched-short ...   # run these recipes, in order
    python experiments/recipes.py --table                      # rewrite RECIPES.md from recipes.jsonl

Each run appends a row to ``experiments/recipes.jsonl``, registers itself under
``experiments/runs/`` (``molting compare`` reads it) and rewrites ``experiments/RECIPES.md``.
Work files go to ``experiments/out/<recipe>/`` (not kept in git).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import yaml

from molting.persona import Persona
from molting.pipeline import RunConfig, run
from molting.train import TrainConfig

HERE = Path(__file__).resolve().parent
PERSONA = HERE.parent / "examples" / "claudio"
ROWS = HERE / "recipes.jsonl"
TABLE = HERE / "RECIPES.md"
# The inference prompt of examples/claudio before this search (the README's "full" prompt, 328
# tokens with SmolLM2's template) and a 60-token one written for it.
FULL_PROMPT = (HERE / "prompts" / "full.txt").read_text(encoding="utf-8").strip()
TINY_PROMPT = (HERE / "prompts" / "tiny.txt").read_text(encoding="utf-8").strip()
# dataset.jsonl's first 157 examples are the dataset before this search; the 109 after them
# (English turns, multi-turn, refusals, varied identity answers) were written for it.
V1_EXAMPLES = 157
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (what it changes, persona changes, TrainConfig changes)
#   persona changes, each against the persona before this search (full inference prompt, short
#   training prompt, the first 157 examples): extra=True trains on all of dataset.jsonl;
#   infer="train"|"short" infers with the training prompt or prompts/tiny.txt; train="full"|"short"
#   trains with the full prompt or prompts/tiny.txt.
#   reuse="<recipe>" trains nothing: that recipe's trained model, exported with this persona;
#   repetition_penalty=x judges with that decoding instead of 1.3, the default while the search ran.
RECIPES: dict[str, tuple[str, dict, dict]] = {
    "baseline": (
        "today's default: short training prompt, full inference prompt (matched-short's weights)",
        {"reuse": "matched-short"},
        {},
    ),
    "matched-short": (
        "inference with the short training prompt (same prompt in training and use)",
        {"infer": "train"},
        {},
    ),
    "matched-full": ("training with the full inference prompt", {"train": "full"}, {}),
    "extra": ("matched-short + dataset-extra.jsonl (266 examples)", {"infer": "train", "extra": True}, {}),
    "extra-1ep": (
        "extra, 1 epoch (the same number of steps as 2 epochs of 157)",
        {"infer": "train", "extra": True},
        {"num_train_epochs": 1.0},
    ),
    "extra-1ep-full": (
        "extra-1ep, full fine-tuning (every weight, lr 1e-4)",
        {"infer": "train", "extra": True},
        {"num_train_epochs": 1.0, "finetuning": "full", "learning_rate": 1e-4},
    ),
    "extra-1ep-dpo": (
        "extra-1ep, then DPO on preferences.jsonl (58 pairs, 1 epoch, beta 0.1, lr 1e-4)",
        {"infer": "train", "extra": True},
        {"num_train_epochs": 1.0, "method": "dpo", "dpo_epochs": 1.0},
    ),
    "extra-rp1.1": (
        "extra's weights, decoded with repetition_penalty 1.1 instead of 1.3",
        {"infer": "train", "extra": True, "reuse": "extra", "repetition_penalty": 1.1},
        {},
    ),
    "extra-3ep": ("extra, 3 epochs", {"infer": "train", "extra": True}, {"num_train_epochs": 3.0}),
    "extra-lr2e-4": ("extra, learning rate 2e-4", {"infer": "train", "extra": True}, {"learning_rate": 2e-4}),
    "extra-r64": ("extra, r 64, lora_alpha 128", {"infer": "train", "extra": True}, {"r": 64, "lora_alpha": 128}),
    "extra-attn": ("extra, LoRA on attention only", {"infer": "train", "extra": True}, {"target_modules": ATTENTION}),
    "extra-full": (
        "extra, full fine-tuning (every weight, lr 1e-4)",
        {"infer": "train", "extra": True},
        {"finetuning": "full", "learning_rate": 1e-4},
    ),
    "extra-tiny-prompt": (
        "extra, 60-token prompt in training and use",
        {"infer": "short", "train": "short", "extra": True},
        {},
    ),
}


def make_persona(name: str, changes: dict, out: Path) -> Persona:
    """Write the recipe's persona directory under ``out`` and load it (the lint and the registry read files)."""
    target = out / "persona"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(PERSONA, target, ignore=shutil.ignore_patterns("labelled.jsonl"))
    spec = yaml.safe_load((PERSONA / "persona.yaml").read_text(encoding="utf-8"))
    spec["system_prompt"] = FULL_PROMPT
    if changes.get("train") == "full":
        spec["train_system_prompt"] = FULL_PROMPT
    if changes.get("train") == "short":
        spec["train_system_prompt"] = TINY_PROMPT
    if changes.get("infer") == "train":
        spec["system_prompt"] = spec["train_system_prompt"]
    if changes.get("infer") == "short":
        spec["system_prompt"] = TINY_PROMPT
    (target / "persona.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    lines = (PERSONA / "dataset.jsonl").read_text(encoding="utf-8").splitlines()
    kept = lines if changes.get("extra") else lines[:V1_EXAMPLES]
    (target / "dataset.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    return Persona.load(target)


class LogUI:
    """Progress as plain lines (the run's log), tables left to the report."""

    def step(self, title: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {title}", flush=True)

    def bar(self, title, total):
        from contextlib import nullcontext

        return nullcontext(lambda done, total=None: None)

    def __getattr__(self, name):  # budget, lint, table, verify: shown in report.md
        return lambda *args, **kwargs: None


def run_recipe(name: str, quant: str) -> dict:
    what, persona_changes, train_changes = RECIPES[name]
    out = HERE / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    persona = make_persona(name, persona_changes, out)
    if "reuse" in persona_changes:
        return reuse_recipe(name, persona, quant)
    config = RunConfig(
        generation=_generation(persona_changes),
        out=out / "run",
        train=replace(TrainConfig(), **train_changes),
        quant=quant,
        registry=HERE / "runs",
        models=("gguf",),
        probe_bare=False,
    )
    start = time.perf_counter()
    result = run(persona, config, LogUI())
    wall = time.perf_counter() - start
    record = json.loads((out / "run" / "run.json").read_text())
    (gguf_result,) = result.results.values()
    row = _row(name, what, persona, train_changes, persona_changes, gguf_result, record, wall, None)
    row["entry"] = str(result.entry.relative_to(HERE.parent))
    return row


def _generation(changes: dict):
    from molting.backends.base import GenerationConfig

    # The search ran at 1.3, the default until its extra-rp1.1 row made 1.1 the default.
    return GenerationConfig(repetition_penalty=changes.get("repetition_penalty", 1.3))


def reuse_recipe(name: str, persona: Persona, quant: str) -> dict:
    """Export another recipe's trained model with this recipe's persona (its prompt) and judge the GGUF."""
    from molting import registry
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.eval.probes import load_probes, run_probes
    from molting.eval.rubric import Sampling, evaluate, load_rubric
    from molting.pipeline import export_gguf

    what, changes, _ = RECIPES[name]
    source = HERE / "out" / changes["reuse"] / "run"
    out = HERE / "out" / name
    start = time.perf_counter()
    export = export_gguf(persona, source / "merged", out / f"{persona.slug}.{quant}.gguf", quant, LogUI(), verify=None)
    config = RunConfig(generation=_generation(changes))
    backend = LlamaCppBackend(export.path, n_ctx=config.n_ctx)
    try:
        result = evaluate(
            backend, persona, load_rubric(persona), config.generation, label=f"GGUF {quant}", sampling=Sampling()
        )
        probe_config = replace(config.generation, max_new_tokens=config.probe_max_new_tokens)
        result.probes = [run_probes(backend, persona, load_probes(persona), probe_config, label=result.label)]
    finally:
        backend.close()
    settings = registry.config_dict(reuse=changes["reuse"], generation=config.generation, sampling=Sampling())
    entry = registry.record(HERE / "runs", persona, "eval", settings, [result])
    record = json.loads((source / "run.json").read_text())
    return _row(name, what, persona, {}, changes, result, record, time.perf_counter() - start, entry)


def _row(name, what, persona, train_changes, persona_changes, result, record, wall, entry) -> dict:
    probes = result.probes[0]
    return {
        "recipe": name,
        "what": what,
        "examples": len(persona.examples),
        "train": train_changes,
        "persona": persona_changes,
        "gguf": result.label,
        "rubric_mean": result.mean,
        "rubric_noise": result.noise,
        "probes_passed": probes.passed,
        "probes_asked": len(probes.outcomes),
        "train_seconds": record["train_seconds"],
        "wall_seconds": round(wall, 1),
        "loss_first": record["loss"][0]["loss"],
        "loss_last": record["loss"][-1]["loss"],
        "entry": str(entry.root.relative_to(HERE.parent)) if entry else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def rejudged(row: dict) -> dict:
    """``row`` with its rubric and probe figures recomputed from its registered answers by today's
    rubric and probes, so that rows judged before a rubric change compare fairly."""
    from molting import registry
    from molting.eval.probes import load_probes, rejudge
    from molting.eval.rubric import load_rubric, rescore

    entry = registry.load(HERE.parent / row["entry"])
    persona = make_persona(row["recipe"], row["persona"], HERE / "out" / row["recipe"])
    result = rescore(entry.result(), persona, load_rubric(persona))
    probes = rejudge(result.probes[0], persona, load_probes(persona))
    return {**row, "rubric_mean": result.mean, "rubric_noise": result.noise, "probes_passed": probes.passed}


def write_table() -> None:
    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [rejudged(row) for row in rows]
    lines = [
        "| recipe | what changes | examples | GGUF | rubric /10 (mean ± noise) | held-out probes "
        "| loss first → last | training | run |",
        "|---|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        rate = r["probes_passed"] / r["probes_asked"]
        lines.append(
            f"| {r['recipe']} | {r['what']} | {r['examples']} | {r['gguf']} "
            f"| {r['rubric_mean']:.1f} ± {r['rubric_noise']:.1f} | "
            f"{r['probes_passed']}/{r['probes_asked']} ({rate:.0%}) | {r['loss_first']:.2f} → {r['loss_last']:.2f} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min |"
        )
    text = (
        TABLE.read_text(encoding="utf-8") if TABLE.exists() else "# Recipe search\n\n<!-- table -->\n<!-- /table -->\n"
    )
    head, rest = text.split("<!-- table -->", 1)
    tail = rest.split("<!-- /table -->", 1)[1]
    TABLE.write_text(head + "<!-- table -->\n" + "\n".join(lines) + "\n<!-- /table -->" + tail, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help=f"recipes to run, in order: {', '.join(RECIPES)}")
    parser.add_argument("--quant", default="Q8_0", help="GGUF type of every run (default Q8_0; the demo uses auto)")
    parser.add_argument("--table", action="store_true", help="only rewrite RECIPES.md from recipes.jsonl")
    args = parser.parse_args()
    if unknown := [r for r in args.recipes if r not in RECIPES]:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    for name in [] if args.table else args.recipes:
        row = run_recipe(name, args.quant)
        with ROWS.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(json.dumps(row, ensure_ascii=False), flush=True)
        write_table()
    if args.table:
        write_table()


if __name__ == "__main__":
    main()
