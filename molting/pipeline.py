"""``molting run``: the whole path, one step after another; and the one function behind each other command.

validate → token budget → dataset lint → LoRA → merge → rubric on base and fine-tuned (transformers)
→ GGUF (F16, then the chosen quant) → rubric on the GGUF (llama.cpp) → report.

``molting validate``, ``train``, ``export`` and ``eval`` call :func:`validate`, :func:`train_persona`,
:func:`molting.export.export_model` and :func:`evaluate_persona`: the same steps ``run`` takes, each
in one place. The persona directory is read once (``molting.persona_dir.PersonaDir``) and handed down.

Every step writes into one run directory::

    adapter/  run.json  budget.json  merged/  <slug>.<QUANT>.gguf  Modelfile
    eval/base.json  eval/finetuned.json  eval/gguf.json  report.md  loss.png  scores.png

and, with ``RunConfig.registry`` set (the CLI's ``--runs``, default ``runs``), a record in the
run registry (``molting.registry``) that ``molting compare`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from molting import backends, registry
from molting.backends.base import GenerationConfig
from molting.data import BudgetReport, token_budget
from molting.errors import ConfigError, Interrupted
from molting.eval.conversations import DRIFT_MAX_NEW_TOKENS, DRIFT_SAMPLING, longest_conversation
from molting.eval.model_judge import model_opinions
from molting.eval.rubric import Rubric, RubricResult, Sampling, load_rubric
from molting.eval.targets import evaluate_targets, target_labels, training_config
from molting.export.steps import ExportResult, export_model, merge
from molting.export.steps import export_adapter_gguf as _export_adapter_gguf
from molting.export.steps import export_gguf as _export_gguf
from molting.export.verify import VerifyConfig, VerifyReport
from molting.io import atomic_path, check_writable_dir
from molting.lint import LintFinding, lint_persona, raise_on_lint_errors
from molting.models import resolve_base_model
from molting.persona import Persona
from molting.persona_dir import PersonaDir, persona_dir
from molting.run_report import run_report
from molting.train import RunRecord, TrainConfig, TrainingData, is_main_process, prepare, resolve_config, train

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
        probe_splits: which probe splits to ask, of "test" (``probes-test.yaml``, the headline)
            and "dev" (``probes.yaml``); the recipe search asks dev only (issue 25).
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
    probe_splits: tuple[str, ...] = ("test", "dev")
    conversations: bool = True
    drift_max_new_tokens: int = DRIFT_MAX_NEW_TOKENS
    drift_sampling: Sampling = field(default_factory=lambda: DRIFT_SAMPLING)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ConfigError(f"models {unknown or '[]'}: choose among {list(MODELS)}")
        if bad := sorted(set(self.probe_splits) - {"test", "dev"}):
            raise ConfigError(f"probe_splits {bad}: choose among ['test', 'dev']")


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


def run(persona: Persona | PersonaDir, config: RunConfig, ui) -> RunResult:
    """Run the whole path for ``persona``; see the module docstring.

    Args:
        persona: a loaded persona directory (``PersonaDir.load``: every file read and checked
            once); a bare ``Persona`` has its rubric and probes read here, once.
        config: see RunConfig.
        ui: progress reporter with ``step(title)``, ``budget(report)`` (a BudgetReport),
            ``lint(findings)`` (``molting.lint.LintFinding`` list),
            ``bar(title, total)`` (a context manager yielding ``advance(done, total=None)``),
            ``table(result)`` (a RubricResult) and ``verify(report)`` (a VerifyReport); the CLI
            passes a rich one, tests a silent one.

    Raises:
        ConfigError: launched in several processes (``WORLD_SIZE`` > 1): only ``train`` runs data-parallel.
    """
    from molting.backends.llamacpp import LlamaCppBackend
    from molting.backends.transformers import TransformersBackend

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "molting run works in one process: train data-parallel with `accelerate launch -m molting.cli "
            "train ...`, then export and evaluate its adapter in one process (docs/training.md)"
        )

    loaded = persona_dir(persona)
    persona = loaded.persona
    config = replace(config, train=resolve_config(config.train))  # finetuning "auto" decided once, here
    out = Path(config.out or Path("runs") / persona.slug)
    _check_outputs(persona, config, out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base_model(config.train.base_model)
    judge = _Evaluation(loaded, config, out, ui)

    record = _train(loaded.persona, config.train, out, ui, check_training_data(loaded, config.train, ui))
    full = config.train.finetuning == "full"
    weights = out / ("model" if full else "adapter")
    try:
        merged = out / "model" if full else merge(base_dir, out / "adapter", out / "merged", ui)
        results = {}
        for label, backend in (
            ("base", lambda: TransformersBackend(base_dir)),
            ("fine-tuned", lambda: TransformersBackend(merged)),
        ):
            if label in config.models:
                results[label] = judge(label, backend)
        verify = replace(config.verify, generation=config.generation) if config.verify else None
        target = lambda quant: out / f"{persona.slug}.{quant}.gguf"  # noqa: E731
        export = export_model(
            persona, merged, target, config.quant, ui, base=base_dir, rubric=loaded.rubric, verify=verify,
            keep_f16=config.keep_f16,
        )
        gguf, label = export.path, f"GGUF {export.quant}"
        if "gguf" in config.models:
            results[label] = judge(label, lambda: LlamaCppBackend(gguf, n_ctx=config.n_ctx))
        _write_modelfile(persona, gguf, config.generation, out)
        report = _write_report(persona, config, record, results, export, out)
        entry = _register(persona, config, record, results, {"adapter": weights, "gguf": gguf, "report": report})
        return RunResult(out, weights, gguf, report, results, export.check, entry)
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(persona, weights)) from None


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

    check_writable_dir(out, "the run directory")
    if config.registry is not None:
        check_writable_dir(config.registry, "the run registry (--runs)")
    quote(persona.system_prompt, f"{persona.root / 'persona.yaml' if persona.root else 'persona'}: system_prompt")


def check_training_data(persona: Persona | PersonaDir, config: TrainConfig, ui) -> TrainingData:
    """Token budget and dataset lint before any training step; a lint error stops here.

    Returns:
        ``molting.train.prepare``'s tokenizer and budgets, for ``train`` to use as they are.

    Raises:
        DatasetError: the lint found an error (``molting.lint``).
    """
    loaded = persona_dir(persona)
    ui.step(f"Token budget (max_length {config.max_length}, {config.base_model}'s chat template)")
    data = prepare(loaded.persona, config)
    ui.budget(data.budget)
    ui.step("Dataset lint")
    findings = lint_persona(loaded, data.budget, data.pair_budget)
    ui.lint(findings)
    raise_on_lint_errors(findings)
    return data


def _train(persona: Persona, config: TrainConfig, out: Path, ui, data: TrainingData) -> RunRecord:
    pairs = f"DPO on {len(persona.preferences)} preference pairs"
    if config.sft_adapter is not None:
        ui.step(f"Training {config.sft_adapter} further: {pairs}")
    else:
        then = f", then {pairs}" if config.method == "dpo" else ""
        what = "every weight" if config.finetuning == "full" else "LoRA"
        ui.step(f"Training {what} on {len(persona.examples)} examples{then}")
    with ui.bar("training", None) as advance:
        record = train(persona, out, config, on_step=lambda step, total, logs: advance(step, total), data=data)
    if is_main_process():
        with atomic_path(out / "budget.json") as tmp:
            tmp.write_text(json.dumps(record.budget, indent=2))
    return record


@dataclass
class TrainResult:
    """What ``molting train`` did: the run record, the weights written and the registry entry."""

    record: RunRecord
    weights: Path
    entry: Path | None = None


def train_persona(
    persona: Persona | PersonaDir, config: TrainConfig, ui, out: Path | None = None, runs: Path | None = None
) -> TrainResult:
    """``molting train``: budget → lint → train → record, the steps ``run`` takes before its rubric.

    Args:
        persona: a loaded persona directory (or a Persona, its rubric and probes read here).
        config: the recipe (``resolve_config`` decides "auto" here).
        ui: as for :func:`run` (``step``, ``budget``, ``lint``, ``bar``).
        out: receives ``adapter/`` or ``model/`` and ``run.json`` (default ``runs/<slug>``).
        runs: the registry to record the command in; None records nothing.

    Raises:
        DatasetError: a lint error; ConfigError: see ``molting.train.train``.
    """
    loaded = persona_dir(persona)
    config = resolve_config(config)
    out = Path(out or Path("runs") / loaded.persona.slug)
    check_writable_dir(out, "--out")
    if runs is not None:
        check_writable_dir(runs, "--runs")
    record = _train(loaded.persona, config, out, ui, check_training_data(loaded, config, ui))
    weights = out / ("model" if config.finetuning == "full" else "adapter")
    entry = None
    if runs is not None and is_main_process():  # under `accelerate launch` the main process records
        artifacts = {"adapter": weights, "run_json": out / "run.json"}
        settings = registry.config_dict(train=config, **registry.training_settings(record))
        entry = registry.record(runs, loaded.persona, "train", settings, artifacts=artifacts, loss=record.loss).root
    return TrainResult(record, weights, entry)


@dataclass(frozen=True)
class ConversationBudget:
    """How long the held-out conversations grow (``longest_conversation``), against the contexts.

    Attributes:
        conversations: how many held-out conversations the persona has.
        longest: the id of the one whose prompt grows longest.
        tokens: its tokens at the last turn when every answer takes ``max_new_tokens``.
        max_new_tokens: the answer length assumed.
        context: the base model's context window (``max_position_embeddings``); None when unknown.
        n_ctx: ``molting run``'s llama.cpp context (``RunConfig.n_ctx``).
    """

    conversations: int
    longest: str
    tokens: int
    max_new_tokens: int
    context: int | None
    n_ctx: int

    @property
    def outgrows(self) -> bool:
        """The longest conversation needs more than the smaller context: its oldest turns will be dropped."""
        return self.tokens > min(c for c in (self.context, self.n_ctx) if c)


@dataclass
class Validation:
    """What ``molting validate`` found: the budgets under both system prompts, and the lint.

    Attributes:
        persona: the persona directory as loaded.
        budgets: ``{"training": ..., "inference": ...}``: the examples' token budgets with each
            system prompt, under the training tokenizer and chat template.
        pair_budget: the preference pairs' budget; None without pairs.
        findings: the lint's findings (``molting.lint``).
        conversations: the held-out conversations' budget; None without conversations.yaml.
    """

    persona: PersonaDir
    budgets: dict[str, BudgetReport]
    pair_budget: BudgetReport | None
    findings: list[LintFinding]
    conversations: ConversationBudget | None = None

    @property
    def ok(self) -> bool:
        """No lint error (warnings pass)."""
        return not any(f.severity == "error" for f in self.findings)


def validate(
    persona: Persona | PersonaDir, config: TrainConfig | None = None, max_new_tokens: int = DRIFT_MAX_NEW_TOKENS
) -> Validation:
    """``molting validate``: the token budgets ``train`` will face, the dataset lint, and with
    held-out conversations how long the longest grows when every answer takes ``max_new_tokens``.

    Raises:
        ConfigError: no examples; ModelFileError: an unusable base model.
    """
    loaded = persona_dir(persona)
    data = prepare(loaded.persona, config or TrainConfig())
    examples, limit = loaded.persona.examples, data.config.max_length
    inference = token_budget(data.tokenizer, examples, loaded.persona.system_prompt, limit)
    findings = lint_persona(loaded, data.budget, data.pair_budget)
    budgets = {"training": data.budget, "inference": inference}
    conversations = None
    if loaded.conversations is not None:
        conversations = _conversation_budget(data, loaded, max_new_tokens)
    return Validation(loaded, budgets, data.pair_budget, findings, conversations)


def _conversation_budget(data: TrainingData, loaded: PersonaDir, max_new_tokens: int) -> ConversationBudget:
    """The longest held-out conversation under the training tokenizer, against the model's and llama.cpp's context."""
    from transformers import AutoConfig

    scripts = loaded.conversations
    cid, tokens = longest_conversation(data.tokenizer, loaded.persona.system_prompt, scripts, max_new_tokens)
    model_config = AutoConfig.from_pretrained(resolve_base_model(data.config.base_model))
    context = getattr(model_config, "max_position_embeddings", None)
    return ConversationBudget(len(scripts.scripts), cid, tokens, max_new_tokens, context, RunConfig.n_ctx)


@dataclass
class _Evaluation:
    """Judges one model of a run: the rubric, then each probe split asked; saved as ``eval/<name>.json``."""

    persona: PersonaDir
    config: RunConfig
    out: Path
    ui: object

    def __call__(self, label: str, make_backend: Callable) -> RubricResult:
        """The model's RubricResult (probes attached), saved and shown (``ui.table``)."""
        config = self.config
        probes = [s for s in self.persona.probe_splits if s.split in config.probe_splits] if config.probes else []
        limit = min(config.generation.max_new_tokens, config.probe_max_new_tokens)
        (result,) = evaluate_targets(
            self.persona.persona,
            self.persona.rubric,
            {label: make_backend},
            config.generation,
            config.sampling,
            self.ui,
            probes,
            replace(config.generation, max_new_tokens=limit),
            bare=config.probe_bare,
            scripts=self.persona.conversations if config.conversations else None,
            drift_config=replace(config.generation, max_new_tokens=config.drift_max_new_tokens),
            drift_sampling=config.drift_sampling,
        )
        name = label.lower().split()[0].replace("-", "")
        with atomic_path(self.out / "eval" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        self.ui.table(result)
        return result


@dataclass
class Evaluation:
    """What ``molting eval`` measured: one result per model, the judge's opinions, the registry entry.

    Attributes:
        results: one RubricResult per model, probes attached, in the order given.
        opinions: with a judge, per result (same order) ``{"model", "opinions"}``; else empty.
        entry: the registry entry's directory; None when nothing was recorded.
    """

    results: list[RubricResult]
    opinions: list[dict] = field(default_factory=list)
    entry: Path | None = None


def evaluate_persona(
    persona: Persona | PersonaDir,
    models: Sequence[str],
    ui,
    *,
    labels: Sequence[str] | None = None,
    generation: GenerationConfig | None = None,
    sampling: Sampling | None = None,
    probes: bool = True,
    probe_max_new_tokens: int = 128,
    conversations: bool = True,
    drift_max_new_tokens: int = DRIFT_MAX_NEW_TOKENS,
    drift_samples: int = DRIFT_SAMPLING.n,
    judge: str | None = None,
    runs: Path | None = None,
) -> Evaluation:
    """``molting eval``: the rubric (and probes) on each model, a judge's second opinion, the record.

    Args:
        persona: a loaded persona directory (or a Persona, its rubric and probes read here).
        models: GGUF files, model/adapter/run directories or embedded names
            (``molting.backends.load_backend``); the first is the reference for retention.
        ui: ``step`` and ``bar`` (see :func:`run`).
        labels: one column name per model (default ``target_labels``).
        generation, sampling: decoding of every model (defaults: ``GenerationConfig()``, ``Sampling()``).
        probes: also ask the held-out probes, answers cut at ``probe_max_new_tokens``.
        conversations: also hold the held-out conversations (drift), answers cut at
            ``drift_max_new_tokens``, ``drift_samples`` runs each (the greedy one, then seeded samples).
        judge: a model that grades every greedy answer too (``molting.eval.model_judge``); its
            opinions are recorded beside the results.
        runs: the registry to record the command in, after the judge; None records nothing.

    Raises:
        ConfigError: labels that do not fit the models; ModelFileError: a model that cannot be opened.
    """
    loaded = persona_dir(persona)
    generation, sampling = generation or GenerationConfig(), sampling or Sampling()
    targets = dict(zip(target_labels(models, labels), models, strict=True))
    opener = {label: (lambda m=m: backends.load_backend(m)) for label, m in targets.items()}
    probe_set = loaded.probe_splits if probes else []
    probe_config = replace(generation, max_new_tokens=min(generation.max_new_tokens, probe_max_new_tokens))
    scripts = loaded.conversations if conversations else None
    drift = replace(generation, max_new_tokens=drift_max_new_tokens)
    results = evaluate_targets(
        loaded.persona, loaded.rubric, opener, generation, sampling, ui, probe_set, probe_config,
        scripts=scripts, drift_config=drift, drift_sampling=Sampling(n=drift_samples),
    )
    opinions = [_second_opinion(judge, loaded, result, ui) for result in results] if judge else []
    entry = None
    if runs is not None:
        settings = registry.config_dict(
            generation=generation, sampling=sampling, models=targets, train=training_config(models[0])
        )
        entry = registry.record(runs, loaded.persona, "eval", settings, results, opinions=opinions or None).root
    return Evaluation(results, opinions, entry)


def _second_opinion(judge: str, persona: PersonaDir, result: RubricResult, ui) -> dict:
    """``{"model", "opinions"}``: ``judge`` grading ``result``'s greedy answers."""
    ui.step(f"{judge}'s second opinion on {result.label}")
    backend = backends.load_backend(judge)
    try:
        opinions = model_opinions(backend, persona.persona, persona.rubric, result)
    finally:
        backend.close()
    return {"model": judge, "opinions": [asdict(o) for o in opinions]}


def export_gguf(
    persona: Persona,
    merged: Path,
    target: Path | Callable[[str], Path],
    quant: str,
    ui,
    keep_f16: bool = False,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
    rubric: Rubric | None = None,
) -> ExportResult:
    """``molting.export.export_gguf`` with the persona's rubric read when none is given (kept for callers)."""
    rubric = rubric or (load_rubric(persona) if verify is not None else None)
    return _export_gguf(persona, merged, target, quant, ui, keep_f16, verify, rubric)


def export_adapter_gguf(
    persona: Persona,
    base_dir: Path,
    adapter: Path,
    target: Path,
    ui,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
    rubric: Rubric | None = None,
) -> ExportResult:
    """``molting.export.export_adapter_gguf`` with the persona's rubric read when none is given."""
    rubric = rubric or (load_rubric(persona) if verify is not None else None)
    return _export_adapter_gguf(persona, base_dir, adapter, target, ui, verify, rubric)


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
    if config.registry is None:
        return None
    settings = registry.config_dict(
        train=config.train,
        generation=config.generation,
        sampling=config.sampling,
        quant=config.quant,
        **registry.training_settings(record),
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
