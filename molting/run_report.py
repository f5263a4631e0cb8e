"""The markdown report of ``molting run``: budget, loss, rubric side by side, how to run the GGUF."""

from __future__ import annotations

from pathlib import Path


def run_report(
    *, persona, train_config: dict, generation: dict, record, results: dict, gguf: Path, llama_cli: str, check=None
) -> str:
    """Render the run report.

    Args:
        persona: the Persona.
        train_config, generation: the run's settings as dicts.
        record: the training RunRecord.
        results: label -> RubricResult, in column order (base, fine-tuned, GGUF).
        gguf: the exported file.
        llama_cli: the command that chats with it.
        check: the export's VerifyReport (``molting.export.verify``), or None when it was skipped.
    """
    from molting.eval.report import compare, reasons_section, rubric_table

    labels = list(results)
    parts = [
        f"# molting run: {persona.name}\n",
        _settings(record, train_config, generation),
        _budget(record.budget),
        _loss(record.loss),
        "## Rubric\n",
        f"Same questions and decoding for every column ({_decoding(generation)}).\n",
        rubric_table(list(results.values())),
        "",
    ]
    for before, after in zip(labels, labels[1:], strict=False):
        parts += [f"### {after} vs {before}\n", compare(results[before], results[after]).to_markdown(), ""]
    parts += [f"## Answers: {label}\n\n{reasons_section(results[label])}" for label in labels]
    parts += [_export_check(check), _how_to_run(gguf, llama_cli)]
    return "\n".join(parts) + "\n"


def _settings(record, train_config: dict, generation: dict) -> str:
    keys = (
        "base_model",
        "r",
        "lora_alpha",
        "lora_dropout",
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
    )
    rows = "\n".join(f"| {k} | {train_config[k]} |" for k in keys)
    memory = f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind.upper()}"
    return (
        "## Training\n\n"
        f"{record.device.upper()}, {'QLoRA (NF4 base)' if record.quantization == '4bit' else 'LoRA'}, "
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


def _loss(loss: list[dict]) -> str:
    if not loss:
        return "## Loss\n\nNo loss was logged.\n"
    values = [entry["loss"] for entry in loss]
    first, last = values[0], values[-1]
    return (
        "## Loss\n\n"
        f"{len(values)} steps, {first:.3f} → {last:.3f} ({(last - first) / first:+.0%}). "
        "Loss is not the verdict: the research log saw loss fall 35% while the answers got worse; "
        "the rubric below is.\n\n```\n" + ascii_curve(values) + "\n```\n"
    )


def ascii_curve(values: list[float], width: int = 60, height: int = 10) -> str:
    """A plain-text line chart of ``values`` (resampled to ``width`` columns)."""
    n = len(values)
    cols = [values[min(n - 1, round(i * (n - 1) / max(1, width - 1)))] for i in range(min(width, n))]
    low, high = min(cols), max(cols)
    span = (high - low) or 1.0
    rows = []
    for level in range(height - 1, -1, -1):
        cells = "".join("•" if round((v - low) / span * (height - 1)) == level else " " for v in cols)
        label = f"{low + span * level / (height - 1):7.3f}" if level in (0, height - 1) else " " * 7
        rows.append(f"{label} │{cells}")
    rows.append(" " * 8 + "└" + "─" * len(cols) + f" step 1..{n}")
    return "\n".join(rows)


def _decoding(generation: dict) -> str:
    mode = "greedy" if generation["temperature"] == 0 else f"temperature {generation['temperature']}"
    return (
        f"{mode}, repetition_penalty {generation['repetition_penalty']}, max_new_tokens {generation['max_new_tokens']}"
    )


def _export_check(check) -> str:
    if check is None:
        return "## Export check\n\nSkipped (`--no-verify`).\n"
    return "## Export check\n\n" + check.to_markdown()


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
