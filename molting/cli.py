"""The ``molting`` command. Handlers parse options, call the library and print with rich."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from molting.backends.base import GenerationConfig
from molting.errors import MoltingError
from molting.eval.rubric import Sampling

# The libraries' own tqdm bars would interleave with molting's rich ones.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(help="AI personality portability: persona → LoRA → rubric → GGUF.", no_args_is_help=True)
console = Console()

PersonaDir = Annotated[Path, typer.Argument(help="persona directory (persona.yaml, dataset.jsonl, rubric.yaml)")]
Base = Annotated[str, typer.Option("--base", help="embedded model name or local model directory")]
# Training options default to None: "TrainConfig's default", kept in one place (molting.train).
Epochs = Annotated[float, typer.Option(help="training epochs [default: TrainConfig's]")]
Rank = Annotated[int, typer.Option("--r", help="LoRA rank r [default: TrainConfig's]")]
Alpha = Annotated[int, typer.Option(help="LoRA alpha, scale = lora_alpha / r [default: TrainConfig's]")]
LR = Annotated[float, typer.Option("--lr", help="learning rate [default: TrainConfig's]")]
MaxLength = Annotated[int, typer.Option(help="training sequence limit, tokens [default: TrainConfig's]")]
Quantization = Annotated[str, typer.Option(help="auto (4-bit on CUDA, none on CPU), 4bit or none")]
MaxNew = Annotated[int, typer.Option(help="max_new_tokens for generation")]
RepPenalty = Annotated[float, typer.Option(help="repetition_penalty (1.0 disables)")]
Samples = Annotated[
    int,
    typer.Option(
        help=f"answers per rubric question: the greedy one, then seeded samples at temperature "
        f"{Sampling.temperature} (mean ± spread; 1 = greedy only)"
    ),
]
Runs = Annotated[Path, typer.Option("--runs", help="run registry directory: each command records itself there")]


class RichUI:
    """Progress for the library's long steps, drawn with rich."""

    def step(self, title: str) -> None:
        console.rule(f"[bold]{title}")

    @contextlib.contextmanager
    def bar(self, title: str, total: int | None):
        columns = [
            SpinnerColumn(),
            TextColumn(title),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(title, total=total)

            def advance(done: int, total: int | None = None) -> None:
                progress.update(task, completed=done, **({"total": total} if total else {}))

            yield advance

    def table(self, result) -> None:
        from molting.eval.report import score_cell

        table = Table(title=f"{result.label}: {result.total:g}/{result.max_total:g} ({result.mean:.1f}/10)")
        for column in ("question", "score", "reasons (first answer)"):
            table.add_column(column)
        for question in result.questions:
            table.add_row(question.prompt, score_cell(question), "; ".join(question.greedy.reasons) or "ok")
        console.print(table)

    def budget(self, report) -> None:
        s = report.summary()
        table = Table(title=f"token budget (max_length {s['max_length']})")
        table.add_column("figure")
        table.add_column("tokens", justify="right")
        for key in (
            "system_prompt_tokens",
            "room_after_system_prompt",
            "tokens_min",
            "tokens_median",
            "tokens_max",
            "truncated_examples",
        ):
            table.add_row(key.replace("_", " "), str(s[key]))
        console.print(table)
        for item in s["truncated"]:
            console.print(f"[yellow]example {item['example']} is {item['tokens_over']} tokens over max_length")


def _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization):
    from molting.train import TrainConfig

    options = dict(
        base_model=base,
        num_train_epochs=epochs,
        r=r,
        lora_alpha=lora_alpha,
        learning_rate=lr,
        max_length=max_length,
        quantization=quantization,
    )
    return TrainConfig(**{k: v for k, v in options.items() if v is not None})


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def validate(persona_dir: PersonaDir, base: Base = "smollm2-135m", max_length: MaxLength = None) -> None:
    """Check a persona directory and print its token budget with the model's tokenizer."""
    from transformers import AutoTokenizer

    from molting.data import token_budget
    from molting.models import resolve_base_model
    from molting.persona import Persona
    from molting.train import TrainConfig

    max_length = max_length or TrainConfig.max_length
    try:
        persona = Persona.load(persona_dir)
        tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base))
    except MoltingError as exc:
        _fail(exc)
    console.print(f"{persona.name}: {len(persona.examples)} examples, language {persona.language}")
    for label, prompt in (("training", persona.train_system_prompt), ("inference", persona.system_prompt)):
        console.print(f"[bold]{label} system prompt")
        RichUI().budget(token_budget(tokenizer, persona.examples, prompt, max_length))


@app.command()
def train(
    persona_dir: PersonaDir,
    out: Annotated[Path, typer.Option(help="output directory (adapter/, run.json)")] = None,
    base: Base = "smollm2-135m",
    epochs: Epochs = None,
    r: Rank = None,
    lora_alpha: Alpha = None,
    lr: LR = None,
    max_length: MaxLength = None,
    quantization: Quantization = "auto",
    runs: Runs = Path("runs"),
) -> None:
    """Fine-tune a LoRA adapter on a persona."""
    from molting import registry
    from molting.persona import Persona
    from molting.train import train as run_training
    from molting.train import training_budget

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        config = _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization)
        out = out or Path("runs") / persona.slug
        ui.budget(training_budget(persona, config))
        with ui.bar("training", None) as advance:
            record = run_training(persona, out, config, on_step=lambda s, n, logs: advance(s, n))
        artifacts = {"adapter": out / "adapter", "run_json": out / "run.json"}
        entry = registry.record(
            runs, persona, "train", registry.config_dict(train=config), artifacts=artifacts, loss=record.loss
        )
    except MoltingError as exc:
        _fail(exc)
    console.print(
        f"adapter: {out / 'adapter'}  ({record.train_seconds:.0f} s, "
        f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind})\nregistered: {entry.root}"
    )


@app.command(name="eval")
def evaluate(
    persona_dir: PersonaDir,
    model: Annotated[
        list[str],
        typer.Option(
            help="GGUF file, model/adapter/run directory or embedded name; repeat for several, "
            "the first is the reference for retention"
        ),
    ] = None,
    label: Annotated[list[str], typer.Option(help="column name per --model, in order")] = None,
    out: Annotated[Path, typer.Option(help="also write the results as a JSON list here")] = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    samples: Samples = Sampling.n,
    runs: Runs = Path("runs"),
) -> None:
    """Score models on the persona's rubric by what they generate; several side by side, with retention."""
    import json

    from rich.markdown import Markdown

    from molting import registry
    from molting.backends import load_backend
    from molting.eval import load_rubric, retention_table
    from molting.eval.targets import evaluate_targets, target_labels, training_config
    from molting.persona import Persona

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        rubric = load_rubric(persona)
        models = model or [str(persona.default_model())]
        labels = target_labels(models, label)
        config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        sampling = Sampling(n=samples)
        targets = dict(zip(labels, models, strict=True))
        opener = {lab: (lambda m=m: load_backend(m)) for lab, m in targets.items()}
        results = evaluate_targets(persona, rubric, opener, config, sampling, ui)
        settings = registry.config_dict(
            generation=config, sampling=sampling, models=targets, train=training_config(models[0])
        )
        entry = registry.record(runs, persona, "eval", settings, results)
    except MoltingError as exc:
        _fail(exc)
    for result in results:
        ui.table(result)
    if len(results) > 1:
        console.rule(f"[bold]retention against {results[0].label}")
        console.print(Markdown(retention_table(results)))
    console.print(f"registered: {entry.root}")
    if out:
        out.write_text(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))


@app.command(name="compare")
def compare_command(
    run: Annotated[
        list[str],
        typer.Argument(
            help="registered run ids or entry directories, oldest first; ID:LABEL picks one model of a run "
            "(one run alone: its models side by side)"
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            help="the result to compare in each run (default: fine-tuned for a `run`, the first model for an `eval`)"
        ),
    ] = None,
    runs: Runs = Path("runs"),
    out: Annotated[Path, typer.Option(help="also write the comparison as markdown here")] = None,
) -> None:
    """The research log's phase table over registered runs: settings changed, scores per question, trend, verdict.

    Given one run, its models side by side with retention against the first.
    """
    from rich.markdown import Markdown

    from molting import registry

    try:
        text = registry.comparison(run, runs, model)
    except (MoltingError, ValueError) as exc:
        _fail(exc)
    console.print(Markdown(text))
    if out:
        out.write_text(text, encoding="utf-8")


@app.command()
def export(
    persona_dir: PersonaDir,
    adapter: Annotated[Path, typer.Option(help="peft adapter directory from `molting train`")],
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    quant: Annotated[str, typer.Option(help="F16, Q8_0, Q4_K_M, ...")] = "Q4_K_M",
    base: Base = "smollm2-135m",
) -> None:
    """Merge an adapter into its base and write a GGUF with the persona's prompt inside."""
    import tempfile

    from molting.export import merge_adapter
    from molting.models import resolve_base_model
    from molting.persona import Persona
    from molting.pipeline import export_gguf

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            ui.step("Merging the adapter into a full-precision copy of the base")
            merged = merge_adapter(resolve_base_model(base), adapter, Path(tmp) / "merged")
            export_gguf(persona, merged, out, quant, ui)
    except MoltingError as exc:
        _fail(exc)
    console.print(f"wrote {out}")


@app.command()
def chat(
    persona_dir: PersonaDir,
    message: Annotated[str, typer.Argument(help="one message; omit for an interactive session")] = None,
    model: Annotated[str, typer.Option(help="GGUF file, model/adapter/run directory or embedded name")] = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
) -> None:
    """Talk to a persona (default: its latest GGUF in runs/, else the embedded base model)."""
    from molting.backends import load_backend
    from molting.persona import Persona

    try:
        persona = Persona.load(persona_dir)
        backend = load_backend(model or persona.default_model())
    except MoltingError as exc:
        _fail(exc)
    options = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    history: list[dict] = []
    while True:
        text = message if message is not None else console.input("[bold]você> ")
        if not text or text in ("/exit", "/quit"):
            return
        answer = persona.chat(text, model=backend, history=history, **options)
        console.print(f"[bold]{persona.name}>[/] {answer}")
        if message is not None:
            return
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


@app.command(name="run")
def run_all(
    persona_dir: PersonaDir,
    out: Annotated[Path, typer.Option(help="run directory (default runs/<persona>)")] = None,
    base: Base = "smollm2-135m",
    epochs: Epochs = None,
    r: Rank = None,
    lora_alpha: Alpha = None,
    lr: LR = None,
    max_length: MaxLength = None,
    quantization: Quantization = "auto",
    quant: Annotated[str, typer.Option(help="GGUF quantization type")] = "Q4_K_M",
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    samples: Samples = Sampling.n,
    runs: Runs = Path("runs"),
) -> None:
    """Validate → budget → train → rubric (base, fine-tuned) → GGUF → rubric (llama.cpp) → report."""
    from molting.persona import Persona
    from molting.pipeline import RunConfig, run

    try:
        persona = Persona.load(persona_dir)
        config = RunConfig(
            out=out,
            quant=quant,
            train=_train_config(base, epochs, r, lora_alpha, lr, max_length, quantization),
            generation=GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty),
            sampling=Sampling(n=samples),
            registry=runs,
        )
        result = run(persona, config, RichUI())
    except MoltingError as exc:
        _fail(exc)
    console.rule("[bold green]done")
    console.print(f"report:  {result.report}\nadapter: {result.adapter}\nGGUF:    {result.gguf}")
    console.print(f"registered: {result.entry}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a job scheduler, a container stop) into SystemExit(143).

    Python's default SIGTERM ends the process at once; as an exception it unwinds, so
    partial GGUF files, adapters and temporary directories are removed as they are on
    Ctrl-C. A signal that arrives inside llama.cpp takes effect when that call returns.
    """

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def main() -> None:
    """The ``molting`` console script."""
    exit_on_sigterm()
    app()


if __name__ == "__main__":
    main()
