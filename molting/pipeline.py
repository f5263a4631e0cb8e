"""``molting run``: the whole path, one step after another.

validate → token budget → dataset lint → LoRA → merge → rubric on base and fine-tuned (transformers)
→ GGUF (F16, then the chosen quant) → rubric on the GGUF (llama.cpp) → report.

Every step writes into one run directory::

    adapter/  run.json  budget.json  merged/  <slug>.<QUANT>.gguf  Modelfile
    eval/base.json  eval/finetuned.json  eval/gguf.json  report.md
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from molting.backends.base import GenerationConfig
from molting.persona import Persona
from molting.train import TrainConfig


@dataclass
class RunConfig:
    """Everything ``molting run`` needs besides the persona.

    Attributes:
        out: the run directory (default ``runs/<persona slug>``).
        train: the LoRA recipe.
        generation: decoding for every rubric pass; identical for base, fine-tuned and GGUF
            so that the comparison is fair (the research log: greedy, repetition_penalty 1.3,
            200 new tokens).
        quant: the GGUF quantization type (molting.export.QUANT_TYPES).
        n_ctx: llama.cpp context for the GGUF rubric pass.
        keep_f16: keep the intermediate F16 GGUF next to the quantized one.
    """

    out: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    quant: str = "Q4_K_M"
    n_ctx: int = 2048
    keep_f16: bool = False


@dataclass
class RunResult:
    """Paths of what a run wrote."""

    out: Path
    adapter: Path
    gguf: Path
    report: Path
    results: dict = field(default_factory=dict)


Step = Callable[[str], None]


def run(persona: Persona, config: RunConfig, ui) -> RunResult:
    """Run the whole path for ``persona``; see the module docstring.

    Args:
        persona: a loaded persona (``Persona.load`` validated it and its dataset).
        config: see RunConfig.
        ui: progress reporter with ``step(title)``, ``budget(report)`` (a BudgetReport),
            ``lint(findings)`` (``molting.data.LintFinding`` list),
            ``bar(title, total)`` (a context manager yielding ``advance(done, total=None)``)
            and ``table(result)`` (a RubricResult); the CLI passes a rich one, tests a silent one.
    """
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.backends.transformers import TransformersBackend
    from molting.eval import evaluate, load_rubric
    from molting.models import resolve_base_model

    out = Path(config.out or Path("runs") / persona.slug)
    out.mkdir(parents=True, exist_ok=True)
    rubric = load_rubric(persona)
    base_dir = resolve_base_model(config.train.base_model)

    _budget(persona, config, ui)
    record = _train(persona, config, out, ui)
    merged = _merge(base_dir, out, ui)
    results = {}
    for label, backend in (
        ("base", lambda: TransformersBackend(base_dir)),
        ("fine-tuned", lambda: TransformersBackend(merged)),
    ):
        results[label] = _evaluate(label, backend, persona, rubric, config, out, ui, evaluate)
    gguf = _export(persona, merged, out, config, ui)
    label = f"GGUF {config.quant}"
    results[label] = _evaluate(
        label, lambda: LlamaCppBackend(gguf, n_ctx=config.n_ctx), persona, rubric, config, out, ui, evaluate
    )
    _write_modelfile(persona, gguf, config.generation, out)
    report = _write_report(persona, config, record, results, gguf, out)
    return RunResult(out, out / "adapter", gguf, report, results)


def _budget(persona: Persona, config: RunConfig, ui) -> None:
    """Token budget and dataset lint before any training step; a lint error stops the run.

    Raises:
        DatasetError: the lint found an error (``molting.data.lint_dataset``).
    """
    from molting.data import lint_persona, raise_on_lint_errors
    from molting.train import training_budget

    ui.step(f"Token budget (max_length {config.train.max_length}, {config.train.base_model}'s chat template)")
    budget = training_budget(persona, config.train)
    ui.budget(budget)
    ui.step("Dataset lint")
    findings = lint_persona(persona, budget)
    ui.lint(findings)
    raise_on_lint_errors(findings)


def _train(persona, config: RunConfig, out: Path, ui):
    from molting.train import train

    ui.step(f"Training LoRA on {len(persona.examples)} examples")
    with ui.bar("training", None) as advance:
        record = train(persona, out, config.train, on_step=lambda step, total, logs: advance(step, total))
    (out / "budget.json").write_text(json.dumps(record.budget, indent=2))
    return record


def _merge(base_dir: Path, out: Path, ui) -> Path:
    from molting.export import merge_adapter

    ui.step("Merging the adapter into a full-precision copy of the base")
    return merge_adapter(base_dir, out / "adapter", out / "merged")


def _evaluate(label, make_backend, persona, rubric, config: RunConfig, out: Path, ui, evaluate):
    ui.step(f"Rubric v{rubric.version} on {label}")
    backend = make_backend()
    try:
        with ui.bar(f"rubric: {label}", len(rubric.questions)) as advance:
            result = evaluate(
                backend, persona, rubric, config.generation, label=label, progress=lambda i: advance(i + 1)
            )
    finally:
        backend.close()
    (out / "eval").mkdir(exist_ok=True)
    name = label.lower().split()[0].replace("-", "")
    (out / "eval" / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    ui.table(result)
    return result


def _export(persona: Persona, merged: Path, out: Path, config: RunConfig, ui) -> Path:
    target = out / f"{persona.slug}.{config.quant}.gguf"
    return export_gguf(persona, merged, target, config.quant, ui, keep_f16=config.keep_f16)


def export_gguf(persona: Persona, merged: Path, target: Path, quant: str, ui, keep_f16: bool = False) -> Path:
    """Write ``merged`` as GGUF F16 with ``persona``'s prompt inside, then quantize it to ``target``.

    Args:
        persona: supplies ``general.name`` and the system prompt baked into the chat template.
        merged: a merged model directory (``merge_adapter``).
        target: the final ``.gguf``; the F16 intermediate is written beside it.
        quant: a ``molting.export.QUANT_TYPES`` key; "F16" writes ``target`` directly.
        ui: as in :func:`run` (``step`` and ``bar``).
        keep_f16: keep the F16 intermediate next to ``target``.
    """
    from molting.export import quantize, write_gguf

    f16 = target if quant.upper() == "F16" else target.with_name(f"{persona.slug}.F16.gguf")
    ui.step(f"Writing GGUF F16 with the chat template and {persona.name}'s system prompt")
    with ui.bar("GGUF F16", None) as advance:
        write_gguf(merged, f16, system_prompt=persona.system_prompt, name=persona.name, progress=advance)
    if f16 == target:
        return target
    ui.step(f"Quantizing to {quant} with llama.cpp's quantizer")
    try:
        quantize(f16, target, quant)
    finally:
        if not keep_f16:
            f16.unlink()
    return target


def llama_cli_command(gguf: Path, generation: GenerationConfig) -> str:
    """The ``llama-cli`` command that chats with ``gguf`` as molting evaluated it.

    ``--jinja`` makes llama.cpp use the GGUF's own chat template, which carries the
    persona's system prompt as its default system message.
    """
    return (
        f"llama-cli -m {gguf} --jinja -cnv --temp {generation.temperature:g} "
        f"--repeat-penalty {generation.repetition_penalty:g} -n {generation.max_new_tokens}"
    )


def _write_modelfile(persona: Persona, gguf: Path, generation: GenerationConfig, out: Path) -> None:
    """An Ollama Modelfile next to the GGUF: ``ollama create <name> -f Modelfile``."""
    system = persona.system_prompt.replace('"""', '\\"\\"\\"')
    (out / "Modelfile").write_text(
        f"FROM ./{gguf.name}\n"
        f'SYSTEM """{system}"""\n'
        f"PARAMETER temperature {generation.temperature:g}\n"
        f"PARAMETER repeat_penalty {generation.repetition_penalty:g}\n"
        f"PARAMETER num_predict {generation.max_new_tokens}\n"
    )


def _write_report(persona, config: RunConfig, record, results: dict, gguf: Path, out: Path) -> Path:
    from molting.run_report import run_report

    text = run_report(
        persona=persona,
        train_config=asdict(config.train),
        generation=asdict(config.generation),
        record=record,
        results=results,
        gguf=gguf,
        llama_cli=llama_cli_command(gguf, config.generation),
    )
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
