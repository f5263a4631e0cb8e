"""The recipe search of issue 14: which training recipe makes the best Cláudio on SmolLM2-135M?

Each recipe is a variant of ``examples/claudio`` (dataset, training prompt, inference prompt)
and of ``TrainConfig``. A run trains it, exports the GGUF, and judges **the GGUF** in llama.cpp,
as a user would run it: the calibrated rubric (3 answers per question: mean ± noise) and the
held-out probes (``probes.yaml``, one greedy answer each). Never the loss.

    python experiments/recipes.py baseline matched-short ...   # run these recipes, in order
    python experiments/recipes.py --table                      # rewrite RECIPES.md from recipes.jsonl
    python experiments/recipes.py --test RECIPE                # once, for a chosen recipe: its test rate

The search chooses by the **dev** probes only (``probes.yaml``; issue 25): a recipe's persona
copy leaves ``probes-test.yaml`` out (after the lint has checked its dataset against both
splits), its runs ask dev only, and its rows hold dev figures. ``--test`` asks a chosen recipe's
GGUF the test probes, once (a second call is refused), into ``test-rates.jsonl``.

Each run appends a row to ``experiments/recipes.jsonl``, registers itself under
``experiments/runs/`` (``molting compare`` reads it) and rewrites ``experiments/RECIPES.md``.
Work files go to ``experiments/out/<recipe>/`` (not kept in git).
"""

from __future__ import annotations

import argparse
import json
import math
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
TEST_ROWS = HERE / "test-rates.jsonl"
TABLE = HERE / "RECIPES.md"
# The inference prompt of examples/claudio before this search (the README's "full" prompt, 328
# tokens with SmolLM2's template) and a 60-token one written for it.
FULL_PROMPT = (HERE / "prompts" / "full.txt").read_text(encoding="utf-8").strip()
TINY_PROMPT = (HERE / "prompts" / "tiny.txt").read_text(encoding="utf-8").strip()
# (examples, preference pairs) of each version of examples/claudio: the first lines of its
# dataset.jsonl and preferences.jsonl. v1: the dataset before this search; v2 (extra=True, the
# default now): 109 examples more (English turns, multi-turn, refusals, varied identity answers)
# and the 58 pairs. v3 (v3=True): v2 and data/v3-*.jsonl, 26 examples more (refusals that say no
# first, the name said first, who is the developer and who the AI in both languages) and 6 pairs
# (English role swaps, refusals); it did not beat v2 (RECIPES.md), so examples/claudio stays v2.
V1, V2 = (157, 58), (266, 58)
V3_FILES = {name: HERE / "data" / f"v3-{name}" for name in ("dataset.jsonl", "preferences.jsonl")}
# v4 (v4=True, issue 25): v2 and data/v4-phrasings.jsonl, 49 examples more: several user phrasings
# per fact (name, AI, maker, João, Softtor, Molting, stack, personality, refusals, small talk), in
# Portuguese and English, the persona asked about in the second person and in the third.
V4_FILE = HERE / "data" / "v4-phrasings.jsonl"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name -> (what it changes, persona changes, TrainConfig changes)
#   persona changes, each against the persona before this search (full inference prompt, short
#   training prompt, the v1 examples): extra=True trains on v2, v3=True on v3;
#   infer="train"|"short" infers with the training prompt or prompts/tiny.txt; train="full"|"short"
#   trains with the full prompt or prompts/tiny.txt.
#   reuse="<recipe>" trains nothing: that recipe's trained model, exported with this persona;
#   sft_from="<recipe>" trains DPO only, continuing that recipe's SFT adapter (TrainConfig.sft_adapter);
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
    "extra-dpo": (
        "extra's SFT adapter, then DPO on preferences.jsonl (58 pairs, 2 epochs, beta 0.1, lr 1e-4)",
        {"infer": "train", "extra": True, "sft_from": "extra"},
        {"method": "dpo"},
    ),
    "v3": (
        "extra + 26 examples: refusals that say no first, the name first, roles in both languages (292)",
        {"infer": "train", "v3": True},
        {},
    ),
    "extra-full-3ep": (
        "extra-full, 3 epochs",
        {"infer": "train", "extra": True},
        {"finetuning": "full", "learning_rate": 1e-4, "num_train_epochs": 3.0},
    ),
    "v3-full": (
        "v3's 292 examples, full fine-tuning (every weight, lr 1e-4)",
        {"infer": "train", "v3": True},
        {"finetuning": "full", "learning_rate": 1e-4},
    ),
    "v3-dpo": (
        "v3's SFT adapter, then DPO on the 64 pairs of v3 (2 epochs, beta 0.1, lr 1e-4)",
        {"infer": "train", "v3": True, "sft_from": "v3"},
        {"method": "dpo"},
    ),
    "extra-full-rp1.0": (
        "extra-full's weights, decoded with no repetition penalty (1.0)",
        {"infer": "train", "extra": True, "reuse": "extra-full", "repetition_penalty": 1.0},
        {},
    ),
    "extra-full-rp1.2": (
        "extra-full's weights, decoded with repetition_penalty 1.2",
        {"infer": "train", "extra": True, "reuse": "extra-full", "repetition_penalty": 1.2},
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
    "phrasings-full": (
        "extra-full + 49 examples: several phrasings per fact, both languages, both persons (315)",
        {"infer": "train", "extra": True, "v4": True},
        {"finetuning": "full", "learning_rate": 1e-4},
    ),
    "extra-tiny-prompt": (
        "extra, 60-token prompt in training and use",
        {"infer": "short", "train": "short", "extra": True},
        {},
    ),
}


def make_persona(name: str, changes: dict, out: Path, lint: bool = True) -> Persona:
    """Write the recipe's persona directory under ``out`` and load it (the lint and the registry read files).

    The copy holds the dev probes and not the test probes: the search cannot read them. Its
    dataset is first linted against both splits (``molting.lint.lint_persona``), unless ``lint``
    is False: re-judging a row's saved answers trains nothing (v3's data holds "Me diz o seu
    nome.", a test probe written after v3 ran).

    Raises:
        DatasetError: the recipe's training data holds a dev or test probe's prompt (or another lint error).
    """
    from molting.eval.probes import SPLIT_FILES
    from molting.lint import lint_persona, raise_on_lint_errors

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
    counts = V2 if changes.get("extra") or changes.get("v3") else V1
    for name, count in zip(("dataset.jsonl", "preferences.jsonl"), counts, strict=True):
        lines = (PERSONA / name).read_text(encoding="utf-8").splitlines()[:count]
        if changes.get("v3"):
            lines += V3_FILES[name].read_text(encoding="utf-8").splitlines()
        if changes.get("v4") and name == "dataset.jsonl":
            lines += V4_FILE.read_text(encoding="utf-8").splitlines()
        (target / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if lint:
        raise_on_lint_errors([f for f in lint_persona(Persona.load(target)) if f.check == "held-out"])
    (target / SPLIT_FILES["test"]).unlink(missing_ok=True)
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
    source = HERE / "out" / persona_changes.get("sft_from", "") / "run"
    sft = {"sft_adapter": str(source / "adapter")} if "sft_from" in persona_changes else {}
    config = RunConfig(
        generation=_generation(persona_changes),
        out=out / "run",
        # Every recipe changes the search's LoRA baseline (r 16, lr 1e-3), whatever "auto" picks today.
        train=replace(TrainConfig(finetuning="lora"), **train_changes, **sft),
        quant=quant,
        registry=HERE / "runs",
        models=("gguf",),
        probe_bare=False,
        probe_splits=("dev",),
    )
    start = time.perf_counter()
    result = run(persona, config, LogUI())
    wall = time.perf_counter() - start
    record = json.loads((out / "run" / "run.json").read_text())
    if sft:  # the SFT phase is the source recipe's: its loss, and its time added to DPO's
        earlier = json.loads((source / "run.json").read_text())
        seconds = record["train_seconds"] + earlier["train_seconds"]
        record = {**record, "loss": earlier["loss"], "train_seconds": seconds}
    (gguf_result,) = result.results.values()
    row = _row(name, what, persona, train_changes, persona_changes, gguf_result, record, wall, None)
    row["entry"] = str(result.entry.relative_to(HERE.parent))
    return row


def _generation(changes: dict):
    """The row's decoding: today's default (repetition_penalty 1.1) unless the recipe says otherwise."""
    from molting.backends.base import GenerationConfig

    return replace(GenerationConfig(), **{k: changes[k] for k in ("repetition_penalty",) if k in changes})


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
    weights = source / "model" if (source / "model").is_dir() else source / "merged"  # full fine-tuning or LoRA
    export = export_gguf(persona, weights, out / f"{persona.slug}.{quant}.gguf", quant, LogUI(), verify=None)
    config = RunConfig(generation=_generation(changes))
    backend = LlamaCppBackend(export.path, n_ctx=config.n_ctx)
    try:
        result = evaluate(
            backend, persona, load_rubric(persona), config.generation, label=f"GGUF {quant}", sampling=Sampling()
        )
        probe_config = replace(config.generation, max_new_tokens=config.probe_max_new_tokens)
        result.probes = [run_probes(backend, persona, load_probes(persona, "dev"), probe_config, label=result.label)]
    finally:
        backend.close()
    settings = registry.config_dict(reuse=changes["reuse"], generation=config.generation, sampling=Sampling())
    entry = registry.record(HERE / "runs", persona, "eval", settings, [result])
    record = json.loads((source / "run.json").read_text())
    return _row(name, what, persona, {}, changes, result, record, time.perf_counter() - start, entry)


def _row(name, what, persona, train_changes, persona_changes, result, record, wall, entry) -> dict:
    from molting.eval.probes import of_split

    probes = of_split(result.probes, "dev")
    return {
        "recipe": name,
        "what": what,
        "examples": len(persona.examples),
        "train": train_changes,
        "persona": persona_changes,
        "gguf": result.label,
        "repetition_penalty": _generation(persona_changes).repetition_penalty,
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
    persona = make_persona(row["recipe"], row["persona"], HERE / "out" / row["recipe"], lint=False)
    result = rescore(entry.result(), persona, load_rubric(persona))
    probes = rejudge(result.probes[0], persona, load_probes(persona, "dev"))
    judged = {"rubric_mean": result.mean, "rubric_noise": result.noise, "probes_passed": probes.passed}
    return {**row, **judged, "outcomes": {o.id: o.passed for o in probes.outcomes}}


# SFT alone against the same SFT followed by DPO: (SFT row, SFT + DPO row).
DPO_PAIRS = [("extra-1ep", "extra-1ep-dpo"), ("extra-rp1.1", "extra-dpo"), ("v3", "v3-dpo")]


def mcnemar(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of ``gained`` probes passing only after the change against
    ``lost`` passing only before it (a sign test over the probes that changed)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def dpo_table(rows: list[dict]) -> list[str]:
    """Per pair of DPO_PAIRS run: probes and rubric before and after DPO, paired over the same probes."""
    by_name = {r["recipe"]: r for r in rows}
    lines = [
        "| SFT alone | SFT + DPO | probes | gained / lost | McNemar p | rubric /10 | difference ± noise |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for before, after in DPO_PAIRS:
        if before not in by_name or after not in by_name:
            continue
        a, b = by_name[before], by_name[after]
        gained = sum(b["outcomes"][i] and not ok for i, ok in a["outcomes"].items())
        lost = sum(ok and not b["outcomes"][i] for i, ok in a["outcomes"].items())
        noise = math.hypot(a["rubric_noise"], b["rubric_noise"])
        lines.append(
            f"| {before} | {after} | {a['probes_passed']} → {b['probes_passed']} of {a['probes_asked']} "
            f"| +{gained} / −{lost} | {mcnemar(gained, lost):.2f} | {a['rubric_mean']:.1f} → {b['rubric_mean']:.1f} "
            f"| {b['rubric_mean'] - a['rubric_mean']:+.1f} ± {noise:.1f} |"
        )
    return lines


def write_table() -> None:
    rows = [json.loads(line) for line in ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [rejudged(row) for row in rows]
    lines = [
        "| recipe | what changes | examples | GGUF | repetition penalty | rubric /10 (mean ± noise) "
        "| dev probes (± s.e.) | loss first → last | training | run |",
        "|---|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        rate = r["probes_passed"] / r["probes_asked"]
        error = (rate * (1 - rate) / r["probes_asked"]) ** 0.5  # binomial standard error of the pass rate
        lines.append(
            f"| {r['recipe']} | {r['what']} | {r['examples']} | {r['gguf']} | {r['repetition_penalty']} "
            f"| {r['rubric_mean']:.1f} ± {r['rubric_noise']:.1f} | {r['probes_passed']}/{r['probes_asked']} "
            f"({rate:.0%} ± {error:.0%}) | {r['loss_first']:.2f} → {r['loss_last']:.2f} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min |"
        )
    text = (
        TABLE.read_text(encoding="utf-8") if TABLE.exists() else "# Recipe search\n\n<!-- table -->\n<!-- /table -->\n"
    )
    text = _between(text, "table", lines)
    if "<!-- test -->" in text:
        text = _between(text, "test", test_table())
    if "<!-- dpo -->" in text:
        text = _between(text, "dpo", dpo_table(rows))
    TABLE.write_text(text, encoding="utf-8")


def test_table() -> list[str]:
    """The chosen recipes' test rates (``test-rates.jsonl``), each measured once, as recorded."""
    text = TEST_ROWS.read_text(encoding="utf-8") if TEST_ROWS.exists() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    lines = ["| recipe | what changes | GGUF | test probes | measured |", "|---|---|---|---:|---|"]
    for r in rows:
        rate = r["passed"] / r["asked"]
        lines.append(
            f"| {r['recipe']} | {r['what']} | {r['gguf']} | {r['passed']}/{r['asked']} ({rate:.0%}) | {r['date']} |"
        )
    return lines


def _between(text: str, mark: str, lines: list[str]) -> str:
    """``text`` with the lines between ``<!-- mark -->`` and ``<!-- /mark -->`` replaced."""
    head, rest = text.split(f"<!-- {mark} -->", 1)
    tail = rest.split(f"<!-- /{mark} -->", 1)[1]
    return head + f"<!-- {mark} -->\n" + "\n".join(lines) + f"\n<!-- /{mark} -->" + tail


def test_rate(name: str, quant: str) -> dict:
    """Ask a chosen recipe's GGUF the TEST probes, once; the row goes to ``test-rates.jsonl``.

    The recipe's persona (its prompt) answers; the probes come from ``examples/claudio``.

    Raises:
        SystemExit: the recipe has a test row already (a test rate is reported once), or no GGUF.
    """
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.eval.probes import load_probes, run_probes

    lines = TEST_ROWS.read_text(encoding="utf-8").splitlines() if TEST_ROWS.exists() else []
    done = [json.loads(line) for line in lines if line.strip()]
    if any(row["recipe"] == name for row in done):
        raise SystemExit(f"error: {TEST_ROWS}: {name} has its test rate already; it is reported once")
    what, changes, _ = RECIPES[name]
    run_dir = HERE / "out" / changes.get("reuse", name) / "run"
    ggufs = sorted((HERE / "out" / name).rglob(f"*.{quant}.gguf"))
    if not ggufs:
        raise SystemExit(f"error: {HERE / 'out' / name}: no *.{quant}.gguf; run the recipe first")
    persona = make_persona(name, changes, HERE / "out" / f"{name}-test")
    backend = LlamaCppBackend(ggufs[0], n_ctx=RunConfig().n_ctx)
    try:
        config = replace(_generation(changes), max_new_tokens=RunConfig().probe_max_new_tokens)
        result = run_probes(backend, persona, load_probes(PERSONA, "test"), config, label=f"GGUF {quant}")
    finally:
        backend.close()
    record = {"recipe": name, "what": what, "run": str(run_dir.relative_to(HERE.parent)), "gguf": ggufs[0].name}
    record |= {"passed": result.passed, "asked": len(result.outcomes), "date": time.strftime("%Y-%m-%d %H:%M UTC")}
    with TEST_ROWS.open("a", encoding="utf-8") as f:
        f.write(json.dumps({**record, "result": result.to_dict()}, ensure_ascii=False) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help=f"recipes to run, in order: {', '.join(RECIPES)}")
    parser.add_argument("--quant", default="Q8_0", help="GGUF type of every run (default Q8_0; the demo uses auto)")
    parser.add_argument("--table", action="store_true", help="only rewrite RECIPES.md from recipes.jsonl")
    parser.add_argument("--test", metavar="RECIPE", help="once, for a chosen recipe: its GGUF's test probe rate")
    args = parser.parse_args()
    if args.test:
        print(json.dumps(test_rate(args.test, args.quant), ensure_ascii=False))
        return
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
