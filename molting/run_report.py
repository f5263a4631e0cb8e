"""The markdown report of ``molting run``: budget, loss, rubric side by side, how to run the GGUF.

Each section is one function returning markdown; ``run_report`` joins them in order.
"""

from __future__ import annotations

from pathlib import Path

from molting.eval.conversations import LATE_TURN, compare_drift, drift_table
from molting.eval.conversations import failures_section as drift_failures
from molting.eval.probes import failures_section, headline_line, probes_table
from molting.eval.report import compare, reasons_section, rubric_table
from molting.plots import drift_chart, loss_chart, scores_chart

LOSS_PNG = "loss.png"
SCORES_PNG = "scores.png"
DRIFT_PNG = "drift.png"


def run_report(
    *,
    persona,
    train_config: dict,
    generation: dict,
    record,
    results: dict,
    gguf: Path,
    llama_cli: str,
    out: Path,
    check=None,
) -> str:
    """Render the run report, one section per function; the pictures are written into ``out``.

    Args:
        persona: the Persona.
        train_config, generation: the run's settings as dicts.
        record: the training RunRecord.
        results: label -> RubricResult, in column order (base, fine-tuned, GGUF).
        gguf: the exported file.
        llama_cli: the command that chats with it.
        check: the export's VerifyReport (``molting.export.verify``), or None when it was skipped.
        out: the run directory: receives ``loss.png``, ``scores.png`` and ``drift.png``, which the
            report (``out/report.md``) links by relative path.
    """
    parts = [
        f"# molting run: {persona.name}\n",
        _headline(results),
        _settings(record, train_config, generation),
        _budget(record.budget),
        _loss(record.loss, out),
        _preferences(record, train_config),
        _rubric(results, generation, out),
        _comparisons(results),
        _probes(results),
        _drift(results, out),
        _answers(results),
        _export_check(check),
        _how_to_run(gguf, llama_cli),
    ]
    return "\n".join(parts) + "\n"


def _settings(record, train_config: dict, generation: dict) -> str:
    full = train_config.get("finetuning") == "full"
    lora = () if full else ("r", "lora_alpha", "lora_dropout")
    keys = (
        "base_model",
        "finetuning",
        *lora,
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "method",
    )
    rows = "\n".join(f"| {k} | {train_config[k]} |" for k in keys if k in train_config)
    memory = f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind.upper()}"
    kind = "QLoRA (NF4 base)" if record.quantization == "4bit" else "LoRA"
    kind = "full fine-tuning (every weight, fp32)" if full else kind
    return (
        "## Training\n\n"
        f"{record.device.upper()}, {kind}, "
        f"{record.train_seconds:.0f} s, {memory}.\n\n| setting | value |\n|---|---|\n{rows}\n"
    )


def _budget(budget: dict) -> str:
    lines = [
        "## Token budget (training prompt, model's own chat template)\n",
        f"- system prompt: {budget['system_prompt_tokens']} tokens of max_length {budget['max_length']}"
        f" ({budget['room_after_system_prompt']} left for the conversation)",
        f"- tokens per example: min {budget['tokens_min']}, median {budget['tokens_median']}, "
        f"max {budget['tokens_max']} over {budget['examples']} examples",
        f"- examples over max_length (truncated in training): {budget['truncated_examples']}",
    ]
    lines += [f"  - example {t['example']}: {t['tokens_over']} tokens over" for t in budget["truncated"][:20]]
    return "\n".join(lines) + "\n"


def _loss(loss: list[dict], out: Path) -> str:
    if not loss:
        return "## Loss\n\nNo loss was logged.\n"
    values = [entry["loss"] for entry in loss]
    first, last = values[0], values[-1]
    loss_chart(loss, out / LOSS_PNG)
    return (
        "## Loss\n\n"
        f"{len(values)} steps, {first:.3f} → {last:.3f} ({(last - first) / first:+.0%}). "
        "Loss is not the verdict: the research log saw loss fall 35% while the answers got worse; "
        f"the rubric below is.\n\n![training loss per step]({LOSS_PNG})\n"
    )


def _preferences(record, train_config: dict) -> str:
    """The DPO phase: settings, then loss and TRL's rewards per step; nothing for an SFT-only run."""
    if not record.dpo:
        return ""
    rows = "\n".join(
        f"| {e['step']} | {e['loss']:.4f} | {e.get('rewards/margins', float('nan')):.3f} "
        f"| {e.get('rewards/accuracies', float('nan')):.2f} |"
        for e in record.dpo
    )
    return (
        "## Preference training (DPO)\n\n"
        f"After SFT, the same adapter trained on preferences.jsonl against the SFT model: beta "
        f"{train_config['beta']}, {train_config['dpo_epochs']} epochs, learning rate "
        f"{train_config['dpo_learning_rate']}, {record.dpo_seconds:.0f} s. A margin is beta x (log-ratio of "
        "the chosen answer - that of the rejected one) to the reference, in nats; the first step is log 2 "
        "and 0 by construction.\n\n"
        f"| step | loss | rewards/margins | rewards/accuracies |\n|---|---|---|---|\n{rows}\n"
    )


def _rubric(results: dict, generation: dict, out: Path) -> str:
    scores_chart(list(results.values()), out / SCORES_PNG)
    sampling = next(iter(results.values())).sampling
    return (
        "## Rubric\n\n"
        f"Same questions and decoding for every column ({_decoding(generation, sampling)}).\n\n"
        f"{rubric_table(list(results.values()))}\n\n![rubric score per question and model]({SCORES_PNG})\n"
    )


def _headline(results: dict) -> str:
    """The held-out pass rate of the test probes (else dev), one line in bold, before anything else."""
    line = headline_line([p for result in results.values() for p in result.probes])
    return f"**{line}**\n" if line else ""


# split -> (title, what it is for) in the report; the test split first: it is the headline.
_SPLITS = {
    "test": ("Test probes (the headline)", "`probes-test.yaml`: used only to report, never to choose anything"),
    "dev": ("Dev probes", "`probes.yaml`: used to choose recipes and thresholds, so they flatter the chosen one"),
}


def _probes(results: dict) -> str:
    """Held-out probes per split, test first: pass rate per kind for every model, then the failures."""
    probed = [p for result in results.values() for p in result.probes]
    parts = []
    for split, (title, what) in _SPLITS.items():
        of_split = [p for p in probed if p.split == split]
        if not of_split:
            continue
        parts += [
            f"## {title}\n",
            f"{len(of_split[0].outcomes)} questions that training never sees ({what}), one greedy answer each; "
            "an answer passes or fails (molting/eval/probes.py).\n",
            probes_table(of_split),
            "",
        ]
        for probe in of_split:
            if failed := failures_section(probe):
                title = probe.label if probe.system_prompt else f"{probe.label}, no system prompt"
                parts += [f"### Failed {split} probes: {title}\n", failed, ""]
    return "\n".join(parts)


def _drift(results: dict, out: Path) -> str:
    """Held-out conversations: share held per turn for every model, the curve, the comparisons, the failures."""
    drifts = [r.drift for r in results.values() if r.drift is not None]
    if not drifts:
        return ""
    drift_chart(drifts, out / DRIFT_PNG)
    first = drifts[0]
    runs = ", ".join(f"temperature {d['temperature']:g} seed {d['seed']}" for d in first.decodings)
    parts = [
        "## Drift: held-out conversations\n",
        f"{len(first.runs[0])} conversations that training never sees (`conversations.yaml`), each answered turn "
        f"by turn with the model's own answers as the history ({runs}). A cell is the share of answers that held "
        f"at that turn in the greedy run, then the mean ± spread over the runs; **≥ {LATE_TURN}** is the share "
        f"from turn {LATE_TURN} on, ± its standard error (molting/eval/conversations.py).\n",
        drift_table(drifts),
        "",
        f"![share of answers held per turn]({DRIFT_PNG})\n",
    ]
    parts += [f"- {compare_drift(b, a).summary()}" for b, a in zip(drifts, drifts[1:], strict=False)]
    for drift in drifts:
        if failed := drift_failures(drift):
            parts += ["", f"### Answers that did not hold: {drift.label} (greedy)\n", failed]
    return "\n".join(parts) + "\n"


def _export_check(check) -> str:
    if check is None:
        return "## Export check\n\nSkipped (`--no-verify`).\n"
    return "## Export check\n\n" + check.to_markdown()


def _comparisons(results: dict) -> str:
    labels = list(results)
    parts = [
        f"### {after} vs {before}\n\n{compare(results[before], results[after]).to_markdown()}\n"
        for before, after in zip(labels, labels[1:], strict=False)
    ]
    return "\n".join(parts)


def _answers(results: dict) -> str:
    return "\n".join(f"## Answers: {label}\n\n{reasons_section(result)}" for label, result in results.items())


def _decoding(generation: dict, sampling: dict | None = None) -> str:
    mode = "greedy" if generation["temperature"] == 0 else f"temperature {generation['temperature']}"
    text = f"{mode}, repetition_penalty {generation['repetition_penalty']}"
    text += f", max_new_tokens {generation['max_new_tokens']}"
    if sampling and sampling.get("n", 1) > 1:
        text += (
            f"; each question answered {sampling['n']} times: the {mode} answer, then {sampling['n'] - 1} samples at "
            f"temperature {sampling['temperature']}, top_p {sampling['top_p']}, seeds {sampling['seed'] + 1}.."
            f"{sampling['seed'] + sampling['n'] - 1}; scores are mean ± spread (standard deviation)"
        )
    return text


def _how_to_run(gguf: Path, llama_cli: str) -> str:
    return (
        "## Run it\n\n"
        f"`{gguf.name}` carries the chat template and the persona's system prompt (as the default "
        "system message and under `molting.system_prompt`).\n\n"
        f"```bash\n{llama_cli}\n"
        f"python -c \"from llama_cpp import Llama; llm = Llama('{gguf}'); "
        "print(llm.create_chat_completion([{'role': 'user', 'content': 'Quem é você?'}])"
        "['choices'][0]['message']['content'])\"\n"
        f"ollama create {gguf.stem.split('.')[0]} -f {gguf.parent / 'Modelfile'}\n```\n"
    )
