"""The ``molting`` command. Handlers parse options, call the library and print with rich."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from molting.backends.base import GenerationConfig
from molting.errors import MoltingError

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
        table = Table(title=f"{result.label}: {result.total}/{result.max_total}")
        for column in ("question", "score", "reasons"):
            table.add_column(column)
        for score in result.scores:
            table.add_row(score.prompt, str(score.score), "; ".join(score.reasons) or "ok")
        console.print(table)

    def lint(self, findings) -> None:
        """Dataset lint findings, errors in red; a line saying so when there are none."""
        if not findings:
            console.print("[green]dataset lint: no findings")
        for finding in findings:
            colour = "red" if finding.severity == "error" else "yellow"
            console.print(f"[{colour}]{escape(str(finding))}", highlight=False)

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


def _fail(exc: MoltingError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def validate(persona_dir: PersonaDir, base: Base = "smollm2-135m", max_length: MaxLength = None) -> None:
    """Check a persona directory, print its token budget with the model's tokenizer, and lint its dataset.

    Exits with 1 when the lint finds an error (see ``molting.data.lint_dataset``).
    """
    from transformers import AutoTokenizer

    from molting.data import lint_persona, token_budget
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
    budgets = {}
    for label, prompt in (("training", persona.train_system_prompt), ("inference", persona.system_prompt)):
        console.print(f"[bold]{label} system prompt")
        budgets[label] = token_budget(tokenizer, persona.examples, prompt, max_length)
        RichUI().budget(budgets[label])
    try:
        findings = lint_persona(persona, budgets["training"])
    except MoltingError as exc:
        _fail(exc)
    RichUI().lint(findings)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(code=1)


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
) -> None:
    """Lint the persona's dataset, then fine-tune a LoRA adapter on it."""
    from molting.data import lint_persona, raise_on_lint_errors
    from molting.persona import Persona
    from molting.train import train as run_training
    from molting.train import training_budget

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        config = _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization)
        out = out or Path("runs") / persona.slug
        budget = training_budget(persona, config)
        findings = lint_persona(persona, budget)
        ui.lint(findings)
        raise_on_lint_errors(findings)
        ui.budget(budget)
        with ui.bar("training", None) as advance:
            record = run_training(persona, out, config, on_step=lambda s, n, logs: advance(s, n))
    except MoltingError as exc:
        _fail(exc)
    console.print(
        f"adapter: {out / 'adapter'}  ({record.train_seconds:.0f} s, "
        f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind})"
    )


@app.command(name="eval")
def evaluate(
    persona_dir: PersonaDir,
    model: Annotated[str, typer.Option(help="GGUF file, model/adapter/run directory or embedded name")] = None,
    label: Annotated[str, typer.Option(help="column name in reports")] = None,
    out: Annotated[Path, typer.Option(help="write the result as JSON here")] = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    judge: Annotated[str, typer.Option(help="a second opinion: this model also grades the answers")] = None,
) -> None:
    """Score a model on the persona's rubric by what it generates (and, with --judge, by a model too)."""
    import json

    from molting.backends import load_backend
    from molting.eval import evaluate as run_rubric
    from molting.eval import load_rubric
    from molting.persona import Persona

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        rubric = load_rubric(persona)
        model = model or str(persona.default_model())
        backend = load_backend(model)
        config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        with ui.bar("rubric", len(rubric.questions)) as advance:
            result = run_rubric(
                backend, persona, rubric, config, label=label or str(model), progress=lambda i: advance(i + 1)
            )
    except MoltingError as exc:
        _fail(exc)
    ui.table(result)
    data = result.to_dict()
    if judge:
        data["judge"] = _second_opinion(judge, persona, rubric, result)
    if out:
        out.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def _second_opinion(judge: str, persona, rubric, result) -> dict:
    """Have ``judge`` grade ``result``'s answers; print both scores side by side."""
    from dataclasses import asdict

    from molting.backends import load_backend
    from molting.eval.model_judge import model_opinions

    try:
        backend = load_backend(judge)
        opinions = model_opinions(backend, persona, rubric, result)
    except MoltingError as exc:
        _fail(exc)
    table = Table(title=f"{result.label}: molting's score beside {judge}'s (a second opinion, not the score)")
    for column in ("question", "molting", "judge", "judge's reply"):
        table.add_column(column)
    for scored, opinion in zip(result.scores, opinions, strict=True):
        shown = "unreadable" if opinion.score is None else f"{opinion.score:g}"
        table.add_row(scored.prompt, f"{scored.score:g}", shown, opinion.reply.strip()[:120])
    console.print(table)
    return {"model": judge, "opinions": [asdict(o) for o in opinions]}


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
) -> None:
    """Validate → budget → lint → train → rubric (base, fine-tuned) → GGUF → rubric (llama.cpp) → report."""
    from molting.persona import Persona
    from molting.pipeline import RunConfig, run

    try:
        persona = Persona.load(persona_dir)
        config = RunConfig(
            out=out,
            quant=quant,
            train=_train_config(base, epochs, r, lora_alpha, lr, max_length, quantization),
            generation=GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty),
        )
        result = run(persona, config, RichUI())
    except MoltingError as exc:
        _fail(exc)
    console.rule("[bold green]done")
    console.print(f"report:  {result.report}\nadapter: {result.adapter}\nGGUF:    {result.gguf}")


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
