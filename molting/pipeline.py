"""``molting run``: the whole path, one step after another.

validate → token budget → dataset lint → LoRA → merge → rubric on base and fine-tuned (transformers)
→ GGUF (F16, then the chosen quant) → rubric on the GGUF (llama.cpp) → report.

Every step writes into one run directory::

    adapter/  run.json  budget.json  merged/  <slug>.<QUANT>.gguf  Modelfile
    eval/base.json  eval/finetuned.json  eval/gguf.json  report.md  loss.png  scores.png

and, with ``RunConfig.registry`` set (the CLI's ``--runs``, default ``runs``), a record in the
run registry (``molting.registry``) that ``molting compare`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from molting.backends.base import GenerationConfig
from molting.errors import ConfigError, ExportError, Interrupted
from molting.eval.conversations import DRIFT_MAX_NEW_TOKENS, DRIFT_SAMPLING
from molting.eval.rubric import Sampling
from molting.export.verify import (
    AUTO_CANDIDATES,
    FileCheck,
    VerifyConfig,
    VerifyReport,
    check_unquantized,
    choose_quant,
    compare_gguf,
    persona_texts,
    reference_logprobs,
    stop_and_leak,
)
from molting.io import atomic_path
from molting.persona import Persona
from molting.train import TrainConfig, resolve_config

MODELS = ("base", "fine-tuned", "gguf")


@dataclass
class RunConfig:
    """Everything ``molting run`` needs besides the persona.

    Attributes:
        out: the run directory (default ``runs/<persona slug>``).
        train: the LoRA recipe.
        generation: decoding for every rubric pass; identical for base, fine-tuned and GGUF
            so that the comparison is fair (greedy, repetition_penalty 1.1 [the research log: 1.3],
            200 new tokens).
        sampling: answers per question (default greedy + 2 seeded samples at temperature 0.7),
            so that the report gives mean ± spread and the comparisons know their noise.
        registry: the run registry directory (``runs``) to record the run in; None records nothing.
        quant: the GGUF quantization type (molting.export.QUANT_TYPES), or "auto" (see
            :func:`export_gguf`).
        n_ctx: llama.cpp context for the GGUF rubric pass.
        keep_f16: keep the intermediate F16 GGUF next to the quantized one.
        verify: the export's behaviour check (``molting.export.verify``); its replies use
            ``generation``. None skips it.
        models: which models the rubric judges: any of "base", "fine-tuned", "gguf" (the
            recipe search of ``experiments/`` judges the GGUF alone: the base costs minutes).
        probes: also ask the persona's held-out probes (``probes.yaml``, molting.eval.probes),
            with the system prompt on every model and, on the GGUF, also without it (the GGUF's
            chat template carries it; ``probe_bare=False`` skips that second pass). Their answers
            stop at ``probe_max_new_tokens``.
        conversations: also hold the persona's held-out conversations (``conversations.yaml``,
            molting.eval.conversations) with every model: drift turn by turn. Their answers stop
            at ``drift_max_new_tokens``; ``drift_sampling`` gives the runs (greedy, then samples).
    """

    out: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sampling: Sampling = field(default_factory=Sampling)
    quant: str = "auto"
    n_ctx: int = 2048
    keep_f16: bool = False
    verify: VerifyConfig | None = field(default_factory=VerifyConfig)
    registry: Path | None = None
    models: tuple[str, ...] = MODELS
    probes: bool = True
    probe_max_new_tokens: int = 128
    probe_bare: bool = True
    conversations: bool = True
    drift_max_new_tokens: int = DRIFT_MAX_NEW_TOKENS
    drift_sampling: Sampling = field(default_factory=lambda: DRIFT_SAMPLING)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ConfigError(f"models {unknown or '[]'}: choose among {list(MODELS)}")


@dataclass
class RunResult:
    """Paths of what a run wrote; ``check`` is the export's behaviour check (None when skipped)."""

    out: Path
    adapter: Path
    gguf: Path
    report: Path
    results: dict = field(default_factory=dict)
    check: VerifyReport | None = None
    entry: Path | None = None


Step = Callable[[str], None]


def run(persona: Persona, config: RunConfig, ui) -> RunResult:
    """Run the whole path for ``persona``; see the module docstring.

    Args:
        persona: a loaded persona (``Persona.load`` validated it and its dataset).
        config: see RunConfig.
        ui: progress reporter with ``step(title)``, ``budget(report)`` (a BudgetReport),
            ``lint(findings)`` (``molting.data.LintFinding`` list),
            ``bar(title, total)`` (a context manager yielding ``advance(done, total=None)``),
            ``table(result)`` (a RubricResult) and ``verify(report)`` (a VerifyReport); the CLI
            passes a rich one, tests a silent one.
    """
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.backends.transformers import TransformersBackend
    from molting.eval import evaluate, load_rubric
    from molting.eval.conversations import load_conversations
    from molting.eval.probes import load_probes
    from molting.models import resolve_base_model

    config = replace(config, train=resolve_config(config.train))  # finetuning "auto" decided once, here
    out = Path(config.out or Path("runs") / persona.slug)
    _check_outputs(persona, config, out)
    out.mkdir(parents=True, exist_ok=True)
    rubric = load_rubric(persona)
    probes = load_probes(persona) if config.probes else None
    scripts = load_conversations(persona) if config.conversations else None
    base_dir = resolve_base_model(config.train.base_model)
    judge = _Evaluation(persona, rubric, probes, config, out, ui, evaluate, scripts)

    _budget(persona, config, ui)
    record = _train(persona, config, out, ui)
    weights = out / ("model" if config.train.finetuning == "full" else "adapter")
    try:
        merged = out / "model" if config.train.finetuning == "full" else _merge(base_dir, out, ui)
        results = {}
        for label, backend in (
            ("base", lambda: TransformersBackend(base_dir)),
            ("fine-tuned", lambda: TransformersBackend(merged)),
        ):
            if label in config.models:
                results[label] = judge(label, backend)
        export = _export(persona, merged, out, config, ui)
        gguf, label = export.path, f"GGUF {export.quant}"
        if "gguf" in config.models:
            results[label] = judge(label, lambda: LlamaCppBackend(gguf, n_ctx=config.n_ctx), bare=config.probe_bare)
        _write_modelfile(persona, gguf, config.generation, out)
        report = _write_report(persona, config, record, results, export, out)
        entry = _register(persona, config, record, results, {"adapter": weights, "gguf": gguf, "report": report})
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(persona, weights)) from None
    return RunResult(out, weights, gguf, report, results, export.check, entry)


def resume_hint(persona: Persona, weights: Path) -> str:
    """What an interrupted run kept (the trained ``weights``) and the commands that go on from it."""
    where = persona.root or Path(".")
    return (
        f"the trained weights are kept in {weights}; without training again, evaluate them with "
        f"`molting eval {where} --model {weights}` and export them with "
        f"`molting export {where} --adapter {weights} --out {weights.parent / (persona.slug + '.gguf')}`"
    )


def _check_outputs(persona: Persona, config: RunConfig, out: Path) -> None:
    """Before training: the run directory and the registry can be written, and so can the Modelfile.

    Raises:
        ConfigError: a directory is not writable, or is a file.
        ExportError: the system prompt cannot be written into an Ollama Modelfile.
    """
    from molting.export.ollama import quote
    from molting.io import check_writable_dir

    check_writable_dir(out, "the run directory")
    if config.registry is not None:
        check_writable_dir(config.registry, "the run registry (--runs)")
    quote(persona.system_prompt, f"{persona.root / 'persona.yaml' if persona.root else 'persona'}: system_prompt")


def _budget(persona: Persona, config: RunConfig, ui) -> None:
    """Token budget and dataset lint before any training step; a lint error stops the run.

    Raises:
        DatasetError: the lint found an error (``molting.data.lint_dataset``).
    """
    from molting.data import lint_persona, raise_on_lint_errors
    from molting.train import training_budget, training_pair_budget

    ui.step(f"Token budget (max_length {config.train.max_length}, {config.train.base_model}'s chat template)")
    budget = training_budget(persona, config.train)
    ui.budget(budget)
    ui.step("Dataset lint")
    findings = lint_persona(persona, budget, training_pair_budget(persona, config.train))
    ui.lint(findings)
    raise_on_lint_errors(findings)


def _train(persona, config: RunConfig, out: Path, ui):
    from molting.train import train

    pairs = f"DPO on {len(persona.preferences)} preference pairs"
    if config.train.sft_adapter is not None:
        ui.step(f"Training {config.train.sft_adapter} further: {pairs}")
    else:
        then = f", then {pairs}" if config.train.method == "dpo" else ""
        what = "every weight" if config.train.finetuning == "full" else "LoRA"
        ui.step(f"Training {what} on {len(persona.examples)} examples{then}")
    with ui.bar("training", None) as advance:
        record = train(persona, out, config.train, on_step=lambda step, total, logs: advance(step, total))
    with atomic_path(out / "budget.json") as tmp:
        tmp.write_text(json.dumps(record.budget, indent=2))
    return record


def _merge(base_dir: Path, out: Path, ui) -> Path:
    from molting.export import merge_adapter

    ui.step("Merging the adapter into a full-precision copy of the base")
    return merge_adapter(base_dir, out / "adapter", out / "merged")


@dataclass
class _Evaluation:
    """Judges one model: the rubric, then the held-out probes (with the system prompt, and without)."""

    persona: Persona
    rubric: object
    probes: object
    config: RunConfig
    out: Path
    ui: object
    evaluate: Callable
    scripts: object = None

    def __call__(self, label: str, make_backend: Callable, bare: bool = False):
        """The model's RubricResult (probes attached), saved as ``eval/<name>.json`` and shown.

        Args:
            label: the model's name in the report.
            make_backend: opens the model.
            bare: also ask the probes with no system prompt (for a GGUF, whose template carries it).
        """
        from molting.eval.targets import ask_conversations

        config, ui = self.config, self.ui
        ui.step(f"Rubric v{self.rubric.version} on {label}")
        backend = make_backend()
        try:
            with ui.bar(f"rubric: {label}", len(self.rubric.questions) * config.sampling.n) as advance:
                result = self.evaluate(
                    backend,
                    self.persona,
                    self.rubric,
                    config.generation,
                    label=label,
                    sampling=config.sampling,
                    progress=advance,
                )
            if self.probes is not None:
                result.probes = [self._probe(backend, label, mode) for mode in ((True, False) if bare else (True,))]
            if self.scripts is not None:
                generation = replace(config.generation, max_new_tokens=config.drift_max_new_tokens)
                result.drift = ask_conversations(
                    backend, self.persona, self.scripts, generation, config.drift_sampling, label, ui
                )
        finally:
            backend.close()
        name = label.lower().split()[0].replace("-", "")
        with atomic_path(self.out / "eval" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        ui.table(result)
        return result

    def _probe(self, backend, label: str, system_prompt: bool):
        from molting.eval.targets import ask_probes

        generation = self.config.generation
        generation = replace(
            generation, max_new_tokens=min(generation.max_new_tokens, self.config.probe_max_new_tokens)
        )
        return ask_probes(backend, self.persona, self.probes, generation, label, system_prompt, self.ui)


def _export(persona: Persona, merged: Path, out: Path, config: RunConfig, ui) -> ExportResult:
    verify = replace(config.verify, generation=config.generation) if config.verify else None
    target = lambda quant: out / f"{persona.slug}.{quant}.gguf"  # noqa: E731
    return export_gguf(persona, merged, target, config.quant, ui, keep_f16=config.keep_f16, verify=verify)


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote: the file, its type and its check (None with ``verify=None``)."""

    path: Path
    quant: str
    check: VerifyReport | None = None


def export_gguf(
    persona: Persona,
    merged: Path,
    target: Path | Callable[[str], Path],
    quant: str,
    ui,
    keep_f16: bool = False,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
) -> ExportResult:
    """Write ``merged`` as GGUF F16 with ``persona``'s prompt inside, quantize it, and check the result.

    The check (``molting.export.verify``) compares every file written with the merged model on
    the persona's text; an F16 that fails it ends the export before quantization, and no file is
    left. The table is printed (``ui.verify``) and written beside the file as
    ``<stem>.verify.json``.

    Args:
        persona: supplies ``general.name``, the system prompt baked into the chat template,
            and the rubric and dataset the check runs on.
        merged: a merged model directory (``merge_adapter``).
        target: the final ``.gguf``, or a function of the quant type giving it (which names the
            ``auto`` choice by its type). The F16 intermediate is written beside it.
        quant: a ``molting.export.QUANT_TYPES`` key, or ``"auto"``: quantize to
            ``AUTO_CANDIDATES`` smallest first and keep the first whose mean KL is at most
            ``verify.auto_max_kl`` (the F16 if none is); ``"F16"`` writes ``target`` directly.
        ui: as in :func:`run` (``step``, ``bar``, and ``verify(report)``).
        keep_f16: keep the F16 intermediate next to ``target``.
        verify: the check's settings; None skips it (``--no-verify``).

    Raises:
        ExportError: the F16 fails the check, ``auto`` without ``verify``, or a step fails.
    """
    from molting.export import QUANT_TYPES

    quant = quant.upper()
    if quant != "AUTO" and quant not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {quant!r}; allowed: auto, {', '.join(QUANT_TYPES)}")
    if quant == "AUTO" and verify is None:
        raise ExportError("--quant auto chooses by the check's numbers; it cannot run with --no-verify")
    final_for, name_for = _names(target, quant, persona.slug)
    f16 = name_for("F16")
    written: list[Path] = []  # files this export completed: removed again if it fails
    try:
        result = _write_and_check(persona, merged, f16, quant, name_for, ui, verify, written)
        final = final_for(result.quant)
        if result.path != final:
            result.path.replace(final)
            result.path = final
            written.append(final)
            if result.check is not None:
                result.check.get(result.quant).path = str(final)
        if result.check is not None:
            _stop_check(persona, result, ui, verify)
            result.check.write_json(final.with_name(f"{final.name.removesuffix('.gguf')}.verify.json"))
            ui.verify(result.check)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for path in written:
        if path == result.path:
            continue
        if keep_f16 and path == f16:
            path.replace(final_for("F16").with_name(f"{persona.slug}.F16.gguf"))
        else:
            path.unlink(missing_ok=True)
    return result


def _names(target: Path | Callable[[str], Path], quant: str, slug: str):
    """``(final_for, name_for)``: the final path of a quant type, and where it is first written.

    A fixed ``target`` is written directly when it is the asked type. Everything else (the F16
    intermediate, ``auto``'s candidates) is written under a private name beside it
    (``.<slug>.<QUANT>.<pid>.gguf``), so that no file a user already has there, such as an
    earlier export's ``<slug>.F16.gguf``, is overwritten or removed.
    """
    final_for = target if callable(target) else (lambda q: Path(target))

    def name_for(q: str) -> Path:
        if not callable(target) and q == quant:
            return Path(target)
        return final_for(q).with_name(f".{slug}.{q}.{os.getpid()}.gguf")

    return final_for, name_for


def _write_and_check(persona, merged: Path, f16: Path, quant: str, name_for, ui, verify, written) -> ExportResult:
    """F16, its check, then the quantized file(s) and theirs; every file written goes into ``written``."""
    from molting.export import write_gguf

    ui.step(f"Writing GGUF F16 with the chat template and {persona.name}'s system prompt")
    with ui.bar("GGUF F16", None) as advance:
        write_gguf(merged, f16, system_prompt=persona.system_prompt, name=persona.name, progress=advance)
    written.append(f16)
    checker = _Checker(persona, merged, ui, verify) if verify else None
    report = checker.report if checker else None
    if checker:
        check_unquantized(checker.check(f16, "F16"), verify)
    if quant == "F16":
        return ExportResult(f16, "F16", report)
    candidates = AUTO_CANDIDATES if quant == "AUTO" else (quant,)
    for candidate in candidates:
        path = _quantize(f16, name_for(candidate), candidate, ui, written)
        if quant != "AUTO":
            if checker:
                checker.check(path, candidate)
            return ExportResult(path, candidate, report)
        if checker.check(path, candidate).mean_kl <= verify.auto_max_kl:
            break
    chosen = choose_quant(report.files, verify.auto_max_kl) or report.get("F16")
    report.chosen, report.auto_max_kl = chosen.quant, verify.auto_max_kl
    return ExportResult(Path(chosen.path), chosen.quant, report)


def _quantize(f16: Path, path: Path, quant: str, ui, written: list[Path]) -> Path:
    from molting.export import quantize

    ui.step(f"Quantizing to {quant} with llama.cpp's quantizer")
    with ui.bar(f"GGUF {quant}", None) as advance:
        quantize(f16, path, quant, progress=advance)
    written.append(path)
    return path


class _Checker:
    """The reference distributions, computed once, and each file's comparison with them."""

    def __init__(self, persona: Persona, merged: Path, ui, verify: VerifyConfig):
        from transformers import AutoTokenizer

        from molting.eval import load_rubric

        self.ui, self.verify = ui, verify
        ui.step("Behaviour check: next-token distributions of the merged model on the persona's text")
        tokenizer = AutoTokenizer.from_pretrained(merged)
        self.texts = persona_texts(persona, load_rubric(persona), tokenizer, verify.max_positions)
        self.reference = reference_logprobs(merged, self.texts)
        positions = sum(len(ids) - start for ids, start in self.texts)
        self.report = VerifyReport("the merged transformers model (fp32)", len(self.texts), positions)

    def check(self, path: Path, quant: str, lora_path: Path | None = None) -> FileCheck:
        """Compare ``path`` (with the adapter ``lora_path`` applied, when given: the check is then its)."""
        self.ui.step(f"Behaviour check: {quant} in llama.cpp against the merged model")
        top1, mean_kl, max_kl = compare_gguf(path, self.texts, self.reference, self.verify.n_threads, lora_path)
        checked = lora_path or path
        check = FileCheck(quant, str(checked), checked.stat().st_size, top1, mean_kl, max_kl)
        self.report.files.append(check)
        return check


def export_adapter_gguf(
    persona: Persona,
    base_dir: Path,
    adapter: Path,
    target: Path,
    ui,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
) -> ExportResult:
    """Write a LoRA adapter as llama.cpp's adapter GGUF (``write_lora_gguf``) and check it.

    The check merges the adapter into the base and writes the base as F16 GGUF, both in a
    temporary directory beside ``target``, then compares base F16 + adapter in llama.cpp with
    the merged model in transformers under the F16 gate (``check_unquantized``); a failure
    removes ``target``. The table is printed and saved as ``<stem>.verify.json``.

    Args:
        persona: names the file (``general.name``) and supplies the text of the check.
        base_dir: the base model directory the adapter was trained on.
        adapter: the peft adapter directory.
        target: the adapter ``.gguf``.
        ui: ``step``, ``bar`` and ``verify(report)``, as in :func:`run`.
        verify: the check's settings; None skips it.

    Raises:
        ExportError: the adapter does not fit the base, or base + adapter fails the check.
    """
    import tempfile

    from molting.export import merge_adapter, write_gguf, write_lora_gguf

    target = Path(target)
    ui.step(f"Writing {persona.name}'s LoRA adapter as a llama.cpp adapter GGUF")
    with ui.bar("LoRA adapter GGUF", None) as advance:
        write_lora_gguf(adapter, base_dir, target, name=persona.name, progress=advance)
    if verify is None:
        return ExportResult(target, "LoRA", None)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            merged = merge_adapter(base_dir, adapter, Path(tmp) / "merged")
            ui.step("Writing the base as GGUF F16, for the check")
            with ui.bar("GGUF F16 (base)", None) as advance:
                base_gguf = write_gguf(base_dir, Path(tmp) / "base.F16.gguf", progress=advance)
            checker = _Checker(persona, merged, ui, verify)
            check_unquantized(checker.check(base_gguf, "F16 + LoRA", lora_path=target), verify)
        checker.report.write_json(target.with_name(f"{target.name.removesuffix('.gguf')}.verify.json"))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    ui.verify(checker.report)
    return ExportResult(target, "LoRA", checker.report)


def _stop_check(persona: Persona, result: ExportResult, ui, verify: VerifyConfig) -> None:
    """The stop-and-leak test on the file the export keeps; a failure is reported, not raised."""
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.eval import load_rubric

    ui.step(f"Behaviour check: do {result.quant}'s answers stop by themselves, without template tokens?")
    backend = LlamaCppBackend(result.path, n_ctx=2048, n_threads=verify.n_threads)
    try:
        stop = stop_and_leak(backend, persona, load_rubric(persona), verify.generation)
    finally:
        backend.close()
    result.check.get(result.quant).stop = stop


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
    """An Ollama Modelfile next to the GGUF: ``ollama create <name> -f Modelfile`` (molting.export.ollama)."""
    from molting.export.ollama import write_modelfile

    parameters = {
        "temperature": generation.temperature,
        "repeat_penalty": generation.repetition_penalty,
        "num_predict": generation.max_new_tokens,
    }
    write_modelfile(out / "Modelfile", gguf.name, persona.system_prompt, parameters)


def _write_report(persona, config: RunConfig, record, results: dict, export: ExportResult, out: Path) -> Path:
    from molting.run_report import run_report

    gguf = export.path
    text = run_report(
        persona=persona,
        train_config=asdict(config.train),
        generation=asdict(config.generation),
        record=record,
        results=results,
        gguf=gguf,
        llama_cli=llama_cli_command(gguf, config.generation),
        check=export.check,
        out=out,
    )
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def _register(persona: Persona, config: RunConfig, record, results: dict, artifacts: dict) -> Path | None:
    """Record the run in ``config.registry`` (``molting compare`` reads it); the entry's directory."""
    from molting import registry

    if config.registry is None:
        return None
    settings = registry.config_dict(
        train=config.train, generation=config.generation, sampling=config.sampling, quant=config.quant
    )
    entry = registry.record(
        config.registry,
        persona,
        "run",
        settings,
        list(results.values()),
        primary="fine-tuned" if "fine-tuned" in results else None,
        artifacts=artifacts,
        loss=record.loss,
    )
    return entry.root
