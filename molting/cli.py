"""The ``molting`` command. Handlers parse options, call the library and print with rich."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from molting import fit as planner
from molting import fit_train, registry
from molting.backends.base import GenerationConfig
from molting.bench import BenchConfig, report
from molting.bench import bench as run_bench
from molting.errors import ConfigError, Interrupted, MoltingError
from molting.eval.conversations import DRIFT_MAX_NEW_TOKENS, DRIFT_SAMPLING, drift_table
from molting.eval.probes import headline_line, probes_table
from molting.eval.report import retention_table, score_cell
from molting.eval.rubric import Sampling
from molting.fit import MIB
from molting.io import atomic_path, check_output_file, check_writable_dir
from molting.models import EMBEDDED, embedded_gguf
from molting.persona import Persona
from molting.persona_dir import PersonaDir as LoadedPersona

# The libraries' own tqdm bars would interleave with molting's rich ones.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# bitsandbytes (through the `kernels` package) logs warnings on import about an optional CPU
# kernel it cannot fetch; they are not molting's lines and would break the one-line errors.
for _noisy in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


SHOWN = 300  # characters of one user or model text printed in a line, a title or a table cell


def plain(text: object, style: str = "", limit: int = SHOWN) -> Text:
    """``text`` as rich Text: never read as markup (``[/INST]`` is printed as it is), never
    highlighted, and cut to ``limit`` characters (a 1 MB name is not laid out). Every user or
    model text the CLI prints goes through here."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + f"… ({len(text) - limit} more characters)"
    return Text(text, style=style)


def print_error(exc: BaseException) -> None:
    """Show ``exc`` as one line on stderr: ``error: <message>``, the message's lines joined by "; "."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = "; ".join(lines) or type(exc).__name__
    err_console.print(Text.assemble(("error: ", "bold red"), plain(message, limit=4 * SHOWN)))


def os_error(exc: OSError) -> str:
    """``PATH: problem`` for an OSError from the file system (``exc.filename`` and ``exc.strerror``)."""
    return f"{exc.filename}: {exc.strerror or type(exc).__name__}"


class Commands(TyperGroup):
    """molting's commands: a MoltingError, or an OSError naming a file, is one line and exit code 2,
    no traceback; Ctrl-C is one line (what was kept, when something was) and exit code 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoltingError as exc:
            print_error(exc)
            raise typer.Exit(code=2) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            print_error(OSError(os_error(exc)))
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as exc:  # Ctrl-C; an Interrupted says what was kept
            kept = str(exc) if isinstance(exc, Interrupted) else ""
            err_console.print(
                Text.assemble(("interrupted", "bold yellow"), plain(f": {kept}" if kept else "", limit=4 * SHOWN))
            )
            raise typer.Exit(code=130) from None


app = typer.Typer(
    cls=Commands, help="AI personality portability: persona → LoRA → rubric → GGUF.", no_args_is_help=True
)

PersonaDir = Annotated[Path, typer.Argument(help="persona directory (persona.yaml, dataset.jsonl, rubric.yaml)")]
Base = Annotated[
    str, typer.Option("--base", help="embedded model name, local model directory, or Hub id ORG/NAME[@REVISION]")
]
# Training options default to None: "TrainConfig's default", kept in one place (molting.train).
Epochs = Annotated[float, typer.Option(help="training epochs [default: TrainConfig's]")]
Rank = Annotated[int, typer.Option("--r", help="LoRA rank r [default: TrainConfig's]")]
Alpha = Annotated[int, typer.Option(help="LoRA alpha, scale = lora_alpha / r [default: TrainConfig's]")]
LR = Annotated[float, typer.Option("--lr", help="learning rate [default: 1e-3 for LoRA, 1e-4 for full fine-tuning]")]
MaxLength = Annotated[int, typer.Option(help="training sequence limit, tokens [default: TrainConfig's]")]
Quantization = Annotated[str, typer.Option(help="auto (4-bit on CUDA, none on CPU), 4bit or none")]
Method = Annotated[
    str,
    typer.Option(
        help="sft, or dpo: SFT, then DPO on the persona's preferences.jsonl in the same adapter [default: sft]"
    ),
]
Checkpointing = Annotated[
    bool | None,
    typer.Option("--checkpointing/--no-checkpointing", help="activation checkpointing [default: on for 4-bit]"),
]
Finetuning = Annotated[
    str,
    typer.Option(
        help="lora (an adapter), full (every weight, fp32; SFT only), or auto: full when the model's "
        "fp32 weights, gradients and AdamW state fit in 4 GiB (SmolLM2-135M), else lora [default: auto]"
    ),
]
SftAdapter = Annotated[
    Path,
    typer.Option(
        help="with --method dpo: an SFT adapter already trained on this persona (a run's adapter/); "
        "DPO continues it and SFT is skipped"
    ),
]
MaxNew = Annotated[int, typer.Option(help="max_new_tokens for generation")]
RepPenalty = Annotated[float, typer.Option(help="repetition_penalty (1.0 disables)")]
Quant = Annotated[
    str,
    typer.Option(help="GGUF type: F16, Q8_0, Q4_K_M, ... or auto (the smallest whose mean KL stays under 0.01 nats)"),
]
NoVerify = Annotated[
    bool, typer.Option("--no-verify", help="skip the export's behaviour check (llama.cpp vs transformers)")
]
Samples = Annotated[
    int,
    typer.Option(
        help=f"answers per rubric question: the greedy one, then seeded samples at temperature "
        f"{Sampling.temperature} (mean ± spread; 1 = greedy only)"
    ),
]
Runs = Annotated[Path, typer.Option("--runs", help="run registry directory: each command records itself there")]


# Seconds between two plain progress lines when the output is not a terminal.
PLAIN_PROGRESS_INTERVAL = 30.0


def _duration(seconds: float) -> str:
    """``"4 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(title: str, done: int, total: int | None, elapsed: float) -> str:
    """One plain progress line: ``training: step 12/133, 1 min 05 s elapsed, about 10 min 58 s left``.

    The time left is the elapsed time per step so far times the steps to go; it is left out
    until a step is done or while the total is unknown.
    """
    line = f"{title}: step {done}/{total if total else '?'}, {_duration(elapsed)} elapsed"
    if total and 0 < done < total:
        line += f", about {_duration(elapsed / done * (total - done))} left"
    return line


class _PlainProgress:
    """Progress as plain lines, at most one per ``interval`` seconds and one at the end: the live
    bars draw nothing when the output is not a terminal (CI, ``make demo > demo.log``)."""

    def __init__(self, title: str, total: int | None, interval: float = PLAIN_PROGRESS_INTERVAL, clock=None):
        import time

        self.title, self.total, self.interval = title, total, interval
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()
        self.done = 0

    def advance(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total or self.total
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.print()

    def print(self) -> None:
        console.print(plain(progress_line(self.title, self.done, self.total, self.clock() - self.start)))


class RichUI:
    """Progress for the library's long steps, drawn with rich (plain lines when not on a terminal)."""

    def step(self, title: str) -> None:
        console.rule(plain(title, "bold"))

    @contextlib.contextmanager
    def bar(self, title: str, total: int | None):
        if not console.is_terminal:
            lines = _PlainProgress(title, total)
            yield lines.advance
            lines.print()
            return
        columns = [
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(str(plain(title)), total=total)

            def advance(done: int, total: int | None = None) -> None:
                progress.update(task, completed=done, **({"total": total} if total else {}))

            yield advance

    def table(self, result) -> None:
        table = Table(title=plain(f"{result.label}: {result.total:g}/{result.max_total:g} ({result.mean:.1f}/10)"))
        for column in ("question", "score", "reasons (first answer)"):
            table.add_column(column)
        for question in result.questions:
            reasons = "; ".join(question.greedy.reasons) or "ok"
            table.add_row(plain(question.prompt), plain(score_cell(question)), plain(reasons))
        console.print(table)

    def verify(self, report) -> None:
        title = f"export check: {report.positions} positions of the persona's text vs {report.reference}"
        table = Table(title=plain(title))
        for column in ("GGUF", "MiB", "same top-1", "mean KL (nats)", "max KL", "stop & leak"):
            table.add_column(column, justify="left" if column in ("GGUF", "stop & leak") else "right")
        for row in report.rows():
            table.add_row(*(plain(cell) for cell in row))
        console.print(table)
        for check in report.files:
            if check.stop is not None and not check.stop.ok:
                console.print(
                    plain(
                        f"{check.quant}: {check.stop.replies - check.stop.stopped} of {check.stop.replies} "
                        f"replies did not stop by themselves; leaked: {check.stop.leaks or 'nothing'}",
                        "yellow",
                    )
                )

    def lint(self, findings) -> None:
        """Dataset lint findings, errors in red; a line saying so when there are none."""
        if not findings:
            console.print("[green]dataset lint: no findings")
        for finding in findings:
            colour = "red" if finding.severity == "error" else "yellow"
            console.print(plain(finding, colour, limit=4 * SHOWN))

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


def load_persona(path: Path) -> LoadedPersona:
    """Every file of the persona directory ``path``, read and checked once (``PersonaDir.load``)."""
    return LoadedPersona.load(path)


def _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization, method=None, finetuning=None):
    from molting.train import TrainConfig

    options = dict(
        base_model=base,
        method=method,
        finetuning=finetuning,
        num_train_epochs=epochs,
        r=r,
        lora_alpha=lora_alpha,
        learning_rate=lr,
        max_length=max_length,
        quantization=quantization,
    )
    return TrainConfig(**{k: v for k, v in options.items() if v is not None})


def _fail(exc: Exception) -> None:
    print_error(exc)
    raise typer.Exit(code=2)


@app.command()
def validate(
    persona_dir: PersonaDir,
    base: Base = "smollm2-135m",
    max_length: MaxLength = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="answer length assumed for the held-out conversations' budget")
    ] = DRIFT_MAX_NEW_TOKENS,
) -> None:
    """Check a persona directory, print its token budget with the model's tokenizer, and lint its dataset.

    With held-out conversations (conversations.yaml): how many tokens the longest reaches when
    every answer takes max_new_tokens, against the model's context and molting run's llama.cpp n_ctx.

    Exits with 1 when the lint finds an error (see ``molting.lint.lint_dataset``).
    """
    from molting.pipeline import validate as run_validation

    ui = RichUI()
    try:
        loaded = load_persona(persona_dir)
        config = _train_config(base, None, None, None, None, max_length, "auto")
        found = run_validation(loaded, config, max_new_tokens)
    except MoltingError as exc:
        _fail(exc)
    persona = loaded.persona
    pairs = f", {len(persona.preferences)} preference pairs" if persona.preferences else ""
    console.print(plain(f"{persona.name}: {len(persona.examples)} examples{pairs}, language {persona.language}"))
    for label, budget in found.budgets.items():
        console.print(plain(f"{label} system prompt", "bold"))
        ui.budget(budget)
    if found.pair_budget is not None:
        s = found.pair_budget.summary()
        console.print(
            f"preference pairs (training system prompt): tokens min {s['tokens_min']}, median "
            f"{s['tokens_median']}, max {s['tokens_max']}; truncated: {s['truncated_examples']}"
        )
    if found.conversations is not None:
        _print_conversation_budget(found.conversations)
    ui.lint(found.findings)
    if not found.ok:
        raise typer.Exit(code=1)


def _print_conversation_budget(budget) -> None:
    """Print the longest held-out conversation's tokens against the model's and llama.cpp's context
    (``molting.pipeline.ConversationBudget``)."""
    console.print(
        f"held-out conversations: {budget.conversations}; the longest ({budget.longest}) reaches {budget.tokens} "
        f"tokens with answers of {budget.max_new_tokens} tokens (inference system prompt); the model's context: "
        f"{budget.context} tokens, molting run's llama.cpp n_ctx: {budget.n_ctx}",
        markup=False,
        highlight=False,
    )
    if budget.outgrows:
        console.print(
            "[yellow]the longest held-out conversation outgrows the context: its oldest turns will be dropped "
            "(molting.backends.session)"
        )


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
    method: Method = None,
    finetuning: Finetuning = None,
    sft_adapter: SftAdapter = None,
    runs: Runs = Path("runs"),
    checkpointing: Checkpointing = None,
    seed: Annotated[int, typer.Option(help="seed of the adapter's init and the data order")] = 0,
    force: Annotated[bool, typer.Option(help="train even when the memory estimate exceeds the device")] = False,
) -> None:
    """Lint the persona's dataset, then fine-tune on it: every weight of a small model, else a LoRA adapter
    (--finetuning); --method dpo: then DPO on its preferences. Prints the memory estimate first and stops
    when it exceeds the device's memory (--force trains anyway)."""
    from molting.pipeline import train_persona
    from molting.train import resolve_config

    try:
        loaded = load_persona(persona_dir)
        config = _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization, method, finetuning)
        if sft_adapter is not None:
            config = replace(config, sft_adapter=str(sft_adapter))
        config = resolve_config(replace(config, checkpointing=checkpointing, seed=seed))
        _check_training_memory(config, force)
        trained = train_persona(loaded, config, RichUI(), out=out, runs=runs)
    except MoltingError as exc:
        _fail(exc)
    record = trained.record
    if record.dpo:
        last = record.dpo[-1]
        console.print(
            f"DPO: {len(record.dpo)} steps, {record.dpo_seconds:.0f} s; last step: loss {last['loss']:.3f}, "
            f"rewards/margins {last.get('rewards/margins', float('nan')):.3f}, "
            f"rewards/accuracies {last.get('rewards/accuracies', float('nan')):.2f}"
        )
    console.print(
        plain(
            f"{trained.weights.name}: {trained.weights}  ({record.train_seconds:.0f} s, "
            f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind})"
            + (f"\nregistered: {trained.entry}" if trained.entry else ""),
            limit=4 * SHOWN,
        )
    )


def _check_training_memory(config, force: bool) -> None:
    """Print the planner's estimate of ``config``; raise ConfigError when it does not fit, unless ``force``."""
    from molting.train import memory_plan

    plan = memory_plan(config)
    asked = plan.asked
    console.print(
        f"memory estimate: {asked.total / MIB:.0f} MiB on {asked.setup.device} "
        f"({fit_train.describe_setup(asked.setup)}; {fit_train.usable(plan.budget) / MIB:.0f} MiB usable)", markup=False
    )
    if plan.fits(asked) or force:
        return
    hint = f"would fit: {fit_train.describe_setup(plan.best.setup)}" if plan.best else "no setup fits"
    usable = fit_train.usable(plan.budget)
    raise ConfigError(
        f"training needs about {asked.total / MIB:.0f} MiB, more than the {usable / MIB:.0f} MiB "
        f"usable on {asked.setup.device}; {hint} (--force trains anyway)"
    )


# The probe splits as the CLI prints them, the headline first (molting.eval.probes).
PROBE_TITLES = {"test": "TEST probes: the headline, never tuned on", "dev": "dev probes: used to choose recipes"}


@app.command(name="eval")
def evaluate(
    persona_dir: PersonaDir,
    model: Annotated[
        list[str],
        typer.Option(
            help="GGUF file, model/adapter/run directory, embedded name or Hub id ORG/NAME; repeat for several, "
            "the first is the reference for retention"
        ),
    ] = None,
    label: Annotated[list[str], typer.Option(help="column name per --model, in order")] = None,
    out: Annotated[Path, typer.Option(help="also write the results as a JSON list here")] = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    samples: Samples = Sampling.n,
    runs: Runs = Path("runs"),
    judge: Annotated[str, typer.Option(help="a second opinion: this model also grades the answers")] = None,
    probes: Annotated[
        bool,
        typer.Option(
            help="also ask the persona's held-out probes, test (probes-test.yaml) and dev (probes.yaml), "
            "one greedy answer each"
        ),
    ] = True,
    probe_max_new_tokens: Annotated[int, typer.Option(help="answer length of the probes")] = 128,
    conversations: Annotated[
        bool,
        typer.Option(help="also hold the persona's held-out conversations (conversations.yaml): drift per turn"),
    ] = True,
    drift_max_new_tokens: Annotated[
        int, typer.Option(help="answer length in the held-out conversations")
    ] = DRIFT_MAX_NEW_TOKENS,
    drift_samples: Annotated[
        int, typer.Option(help="runs of each held-out conversation: the greedy one, then seeded samples")
    ] = DRIFT_SAMPLING.n,
) -> None:
    """Score models on the persona's rubric by what they generate; several side by side, with retention,
    the held-out probes' pass rates (and, with --judge, a model's second opinion beside molting's score)."""
    import json

    from rich.markdown import Markdown

    from molting.pipeline import evaluate_persona

    ui = RichUI()
    try:
        check_writable_dir(runs, "--runs")
        if out:
            check_output_file(out, force=True)
        loaded = load_persona(persona_dir)
        found = evaluate_persona(
            loaded,
            model or [str(loaded.persona.default_model())],
            ui,
            labels=label,
            generation=GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty),
            sampling=Sampling(n=samples),
            probes=probes,
            probe_max_new_tokens=probe_max_new_tokens,
            conversations=conversations,
            drift_max_new_tokens=drift_max_new_tokens,
            drift_samples=drift_samples,
            judge=judge,
            runs=runs,
        )
    except MoltingError as exc:
        _fail(exc)
    results = found.results
    for result in results:
        ui.table(result)
    if len(results) > 1:
        console.rule(plain(f"retention against {results[0].label}", "bold"))
        console.print(Markdown(retention_table(results)))
    probed = [p for result in results for p in result.probes]
    for split, title in PROBE_TITLES.items():
        if of_split := [p for p in probed if p.split == split]:
            console.rule(plain(f"{title} (pass / asked)", "bold"))
            console.print(Markdown(probes_table(of_split)))
    if drifts := [result.drift for result in results if result.drift is not None]:
        console.rule("[bold]held-out conversations: answers held per turn (drift)")
        console.print(Markdown(drift_table(drifts)))
    for result, opinion in zip(results, found.opinions, strict=False):
        _print_opinion(result, opinion)
    console.print(plain(f"registered: {found.entry}"))
    if out:
        opinions = found.opinions or [None] * len(results)
        data = [r.to_dict() | ({"judge": o} if o else {}) for r, o in zip(results, opinions, strict=True)]
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


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

    try:
        text = registry.comparison(run, runs, model)
    except (MoltingError, ValueError) as exc:
        _fail(exc)
    console.print(Markdown(text))
    if out:
        out.write_text(text, encoding="utf-8")


def _print_opinion(result, opinion: dict) -> None:
    """A judge's grades of ``result``'s greedy answers beside molting's scores."""
    title = f"{result.label}: molting's score beside {opinion['model']}'s (a second opinion, not the score)"
    table = Table(title=plain(title))
    for column in ("question", "molting", "judge", "judge's reply"):
        table.add_column(column)
    for scored, given in zip((q.greedy for q in result.questions), opinion["opinions"], strict=True):
        shown = "unreadable" if given["score"] is None else f"{given['score']:g}"
        table.add_row(plain(scored.prompt), f"{scored.score:g}", shown, plain(given["reply"].strip(), limit=120))
    console.print(table)


@app.command()
def export(
    persona_dir: PersonaDir,
    adapter: Annotated[
        Path, typer.Option(help="`molting train`'s adapter/ (LoRA), or its model/ (full fine-tuning: nothing to merge)")
    ],
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    quant: Quant = "Q4_K_M",
    base: Base = "smollm2-135m",
    no_verify: NoVerify = False,
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only",
            help="write only the LoRA adapter, as llama.cpp's adapter GGUF for the base's F16 GGUF (--lora)",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing GGUF at --out")] = False,
) -> None:
    """Merge an adapter into its base (or take a fully fine-tuned model as it is), write a GGUF with
    the persona's prompt inside, and check it."""
    from molting.export import export_model
    from molting.export.verify import VerifyConfig

    ui = RichUI()
    try:
        check_output_file(out, [adapter, *_base_inputs(base)], force=force, magic=b"GGUF")
        loaded = load_persona(persona_dir)
        verify = None if no_verify else VerifyConfig()
        result = export_model(
            loaded.persona, adapter, out, quant, ui, base=base, rubric=loaded.rubric, verify=verify,
            adapter_only=adapter_only,
        )
    except MoltingError as exc:
        _fail(exc)
    if adapter_only:
        console.print(plain(f"wrote {out}: apply it to the base's GGUF with `llama-cli -m BASE.gguf --lora {out}`"))
    else:
        console.print(plain(f"wrote {result.path} ({result.quant})"))


def _base_inputs(base: str) -> list[Path]:
    """The files a ``--base`` reads: its directory, or an embedded model's GGUF."""
    return [embedded_gguf(base)] if base in EMBEDDED else [Path(base)]


@app.command()
def chat(
    persona_dir: PersonaDir,
    message: Annotated[str, typer.Argument(help="one message; omit for an interactive session")] = None,
    model: Annotated[
        str, typer.Option(help="GGUF file, model/adapter/run directory, embedded name or Hub id ORG/NAME")
    ] = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    temperature: Annotated[float, typer.Option(help="0 is greedy")] = GenerationConfig.temperature,
    top_k: Annotated[int, typer.Option(help="sample among the k likeliest tokens; 0 disables")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus-sampling mass")] = GenerationConfig.top_p,
    stop: Annotated[list[str], typer.Option(help="end the answer at this string (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = GenerationConfig.seed,
) -> None:
    """Talk to a persona, the answer printed as it is generated (default model: its latest GGUF in runs/).

    Without MESSAGE: a conversation until end of input (Ctrl-D) or /exit; /reset forgets the history.
    When the history outgrows the model's context, the oldest turns are dropped (the system prompt stays).
    """
    try:
        persona = Persona.load(persona_dir)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        options |= dict(repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed)
        session = persona.session(model, **options)
    except MoltingError as exc:
        _fail(exc)
    try:
        if message is not None:
            _answer(session, persona.name, message)
            return
        _converse(session, persona.name)
    finally:
        session.backend.close()


def _converse(session, name: str) -> None:
    """Read user turns from stdin until end of input or /exit; /reset clears the history."""
    while True:
        try:
            text = console.input("[bold]você> ").strip()
        except EOFError:
            console.print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            console.print("[dim](history cleared)")
        elif text:
            dropped = session.dropped
            _answer(session, name, text)
            if session.dropped > dropped:
                console.print(f"[dim](the oldest turns were dropped to fit the context: {session.dropped} messages)")


def _answer(session, name: str, text: str) -> None:
    console.print(plain(f"{name}> ", "bold"), end="")
    try:
        _print_stream(session.stream(text))
    except MoltingError as exc:
        console.print()
        print_error(exc)


def _print_stream(chunks) -> str:
    """Print each chunk's text as it arrives (leading whitespace dropped, as ``generate`` strips); return the text."""
    parts: list[str] = []
    for chunk in chunks:
        piece = chunk.text if parts else chunk.text.lstrip()
        if piece:
            parts.append(piece)
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
            console.file.flush()
    console.print()
    return "".join(parts).strip()


@app.command()
def serve(
    persona_dirs: Annotated[list[Path], typer.Argument(help="persona directories; each is a model id: its slug")],
    model: Annotated[
        list[Path],
        typer.Option(
            help="per persona, in order: a GGUF (the persona's model, or its adapter GGUF from `molting export "
            "--adapter-only`), or with --engine vllm a peft adapter or model directory "
            "[default: the newest in runs/<persona>/]"
        ),
    ] = None,
    base: Annotated[str, typer.Option(help="the base GGUF that adapter GGUFs apply to: a file or embedded name")] = (
        "smollm2-135m"
    ),
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 opens it to the network)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the OpenAI-compatible API")] = 8000,
    n_ctx: Annotated[int, typer.Option(help="context window in tokens, shared by the requests in flight")] = 2048,
    parallel: Annotated[int, typer.Option(help="requests decoded together per engine")] = 4,
    threads: Annotated[int, typer.Option(help="CPU threads per engine [default: llama-server's]")] = None,
    engine: Annotated[str, typer.Option(help="llama-server (runs here) or vllm (with --print: its command)")] = (
        "llama-server"
    ),
    print_only: Annotated[bool, typer.Option("--print", help="print the engine commands and exit")] = False,
    runs: Annotated[Path, typer.Option("--runs", help="where `molting run` wrote its run directories")] = Path("runs"),
) -> None:
    """Serve personas through an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)."""
    from molting import serve as serving

    if engine == "vllm":
        from molting.serve.vllm import persona_weights, vllm_commands

        if not print_only:
            raise ConfigError("--engine vllm needs --print: molting writes the vLLM command for a GPU machine")
        personas = [Persona.load(d) for d in persona_dirs]
        weights = model or [persona_weights(p, runs) for p in personas]
        for line in vllm_commands(personas, weights, port):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    if engine != "llama-server":
        raise ConfigError(f"--engine {engine!r}: choose llama-server or vllm")
    served = serving.load_plan(persona_dirs, model or (), base, runs)
    options = serving.EngineOptions(n_ctx=n_ctx, parallel=parallel, n_threads=threads)
    if print_only:
        binary = serving.find_llama_server()
        for i, eng in enumerate(served.engines):
            console.print(" ".join(serving.command(binary, eng, 8080 + i, options)), markup=False, soft_wrap=True)
        return
    names = ", ".join(served.personas)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped: exit 0, engines ended
        serving.run_server(served, host, port, options, on_ready=lambda url: console.print(f"serving {names} at {url}"))
    console.print("stopped")


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
    quant: Quant = "auto",
    method: Method = None,
    finetuning: Finetuning = None,
    max_new_tokens: MaxNew = 200,
    repetition_penalty: RepPenalty = GenerationConfig.repetition_penalty,
    no_verify: NoVerify = False,
    samples: Samples = Sampling.n,
    runs: Runs = Path("runs"),
    conversations: Annotated[
        bool, typer.Option(help="hold the persona's held-out conversations (conversations.yaml) with every model")
    ] = True,
) -> None:
    """Validate → budget → lint → train → rubric (base, fine-tuned) → GGUF → rubric (llama.cpp) → report."""
    from molting.export.verify import VerifyConfig
    from molting.pipeline import RunConfig, run

    try:
        loaded = load_persona(persona_dir)
        config = RunConfig(
            out=out,
            quant=quant,
            verify=None if no_verify else VerifyConfig(),
            train=_train_config(base, epochs, r, lora_alpha, lr, max_length, quantization, method, finetuning),
            generation=GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty),
            sampling=Sampling(n=samples),
            registry=runs,
            conversations=conversations,
        )
        result = run(loaded, config, RichUI())
    except MoltingError as exc:
        _fail(exc)
    console.rule("[bold green]done")
    if line := headline_line([p for r in result.results.values() for p in r.probes]):
        console.print(plain(line))
    paths = f"report:  {result.report}\nadapter: {result.adapter}\nGGUF:    {result.gguf}"
    console.print(plain(paths, limit=4 * SHOWN))
    console.print(plain(f"registered: {result.entry}"))


@app.command()
def bench(
    model: Annotated[
        list[str],
        typer.Option(
            help="GGUF file, run directory, model directory, embedded name, reference name (random weights) or Hub id"
        ),
    ] = None,
    engine: Annotated[
        list[str], typer.Option(help="transformers, llama.cpp, 'llama.cpp raw', llama-bench [default: all]")
    ] = None,
    quant: Annotated[list[str], typer.Option(help="GGUF quantizations for llama.cpp")] = None,
    dtype: Annotated[str, typer.Option(help="transformers weights: fp32, bf16 or 4bit")] = "fp32",
    repeats: Annotated[int, typer.Option(help="runs per case, each in a fresh process")] = 3,
    n_prompt: Annotated[int, typer.Option(help="prompt tokens")] = 512,
    n_new: Annotated[int, typer.Option(help="tokens to generate")] = 128,
    n_ctx: Annotated[int, typer.Option(help="llama.cpp context window")] = 2048,
    threads: Annotated[int, typer.Option(help="CPU threads for every engine [default: every usable CPU]")] = None,
    n_gpu_layers: Annotated[int, typer.Option(help="llama.cpp layers on the GPU (-1 = all)")] = 0,
    repack: Annotated[
        bool, typer.Option(help="llama.cpp's CPU weight repacking (AMX, Q4_K x8); --no-repack where it traps")
    ] = True,
    flash_attn: Annotated[bool, typer.Option(help="llama.cpp's flash attention, for every llama.cpp engine")] = True,
    cache: Annotated[Path, typer.Option(help="where built models and GGUFs are kept")] = None,
    out: Annotated[Path, typer.Option(help="report path without suffix: .md, .json and .png are written")] = Path(
        "benchmarks/reports/bench"
    ),
) -> None:
    """Measure load time, memory, TTFT, prefill and decode speed of every engine x model x quantization."""
    import subprocess

    options = dict(
        dtype=dtype,
        repeats=repeats,
        n_prompt=n_prompt,
        n_new=n_new,
        n_ctx=n_ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        repack=repack,
        flash_attn=flash_attn,
    )
    optional = dict(models=model, engines=engine, quants=quant, cache=cache)
    config = BenchConfig(**options, **{k: tuple(v) if isinstance(v, list) else v for k, v in optional.items() if v})
    try:
        result = run_bench(config, progress=lambda line: console.print(plain(line, "dim")))
    except MoltingError as exc:
        _fail(exc)
    except subprocess.CalledProcessError as exc:
        hint = " (an illegal instruction: try --no-repack)" if exc.returncode == -signal.SIGILL else ""
        what = "llama-bench" if str(exc.cmd[0]).endswith("llama-bench") else "a benchmark worker"
        console.print(f"[bold red]error:[/] {what} failed with status {exc.returncode}{hint}")
        raise typer.Exit(code=1) from None
    console.print(report.table(result), soft_wrap=True, markup=False)
    if result.references:
        console.print(report.reference_table(result), soft_wrap=True, markup=False)
    for line in result.skipped:
        console.print(Text.assemble(("not measured: ", "yellow"), plain(line)))
    console.print(plain("wrote " + ", ".join(str(p) for p in report.write(result, out)), limit=4 * SHOWN))


@app.command()
def fit(
    model: Annotated[
        str,
        typer.Argument(
            help="GGUF file, model directory, Hub id ORG/NAME[@REVISION], or phi-3-mini / tinyllama-1.1b / smollm2-135m"
        ),
    ],
    vram: Annotated[str, typer.Option(help="GPU memory, e.g. 4GiB")] = "4GiB",
    ctx: Annotated[int, typer.Option(help="context window n_ctx, tokens")] = 2048,
    reserve: Annotated[str, typer.Option(help="VRAM for the CUDA context and pools")] = "512MiB",
    layers: Annotated[bool, typer.Option(help="also print every n_gpu_layers of the best plan")] = False,
    repack: Annotated[
        bool, typer.Option(help="count llama.cpp's CPU weight repacking in RAM; --no-repack as in molting bench")
    ] = True,
    train: Annotated[bool, typer.Option("--train", help="plan training instead of llama.cpp inference")] = False,
    finetuning: Annotated[str, typer.Option(help="--train: full, lora or qlora")] = "qlora",
    r: Annotated[int, typer.Option("--r", help="--train: LoRA rank")] = 16,
    max_length: Annotated[int, typer.Option(help="--train: tokens per sequence")] = 512,
    batch_size: Annotated[int, typer.Option(help="--train: sequences per micro-batch")] = 1,
    checkpointing: Checkpointing = None,
    device: Annotated[str, typer.Option(help="--train: cuda (VRAM) or cpu (RAM growth of the process)")] = "cuda",
) -> None:
    """Estimate llama.cpp's memory per quantization, KV cache type and offloaded layers; print the best plan.
    With --train: the memory of full fine-tuning, LoRA or QLoRA, term by term, and the best setup that fits."""
    if train:
        try:
            setup = fit_train.TrainSetup(finetuning, r, max_length, batch_size, checkpointing, device)
        except MoltingError as exc:
            _fail(exc)
        _fit_training(model, setup, vram)
        return
    try:
        shape = planner.load_shape(model)
        result = planner.plan(shape, planner.parse_size(vram), ctx, reserve=planner.parse_size(reserve), repack=repack)
    except MoltingError as exc:
        _fail(exc)
    console.print(_fit_table(result))
    for line in planner.describe(result):
        console.print(plain(line, limit=4 * SHOWN))
    if layers and result.best is not None:
        best = result.best
        rows = planner.layer_table(shape, best.quant, best.kv_type, ctx, result.reserve, repack)
        console.print(_layers_table(rows))


def _fit_training(model: str, setup, vram: str) -> None:
    """``molting fit --train``: every fine-tuning x checkpointing, the asked setup's terms, the plan."""
    try:
        shape = planner.load_shape(model)
        result = fit_train.plan_training(shape, setup, planner.parse_size(vram))
    except MoltingError as exc:
        _fail(exc)
    mib = planner.MIB
    title = (
        f"{shape.name}: training at max_length {setup.max_length}, batch {setup.batch_size}, "
        f"on {setup.device}, budget {result.budget / mib:.0f} MiB (MiB; train: trainable params, grads, "
        f"AdamW; other: NF4 state, dequantized weight, CUDA context and reserve)"
    )
    table = Table(title=title)
    for column in ("method", "ckpt", "weights", "train", "activ.", "loss", "other", "total", "fits"):
        table.add_column(column, justify="left" if column in ("method", "ckpt", "fits") else "right")
    for e in result.table:
        other = e.quant_state + e.dequant + e.runtime
        sizes = (e.weights, e.trainable, e.activations, e.logits, other, e.total)
        table.add_row(
            e.setup.finetuning, "on" if e.setup.ckpt else "off", *(f"{b / mib:.0f}" for b in sizes),
            "yes" if result.fits(e) else "no",
        )
    console.print(table)
    terms = Table(title=fit_train.describe_setup(result.asked.setup))
    terms.add_column("term")
    terms.add_column("MiB", justify="right")
    for name, size in result.asked.rows():
        terms.add_row(name, f"{size / mib:.1f}")
    terms.add_row("total", f"{result.asked.total / mib:.1f}")
    console.print(terms)
    for line in fit_train.describe_plan(result):
        console.print(line, markup=False)


def _fit_table(result) -> Table:
    s = result.shape
    title = f"{s.name}: {s.n_layer} layers, n_ctx {result.n_ctx}, VRAM {result.vram / MIB:.0f} MiB (figures in MiB)"
    table = Table(title=plain(title))
    for column in ("quant", "KV", "weights", "KV cache", "compute", "VRAM all layers", "n_gpu_layers", "VRAM", "RAM"):
        table.add_column(column, justify="left" if column in ("quant", "KV") else "right")
    for o in result.options:
        full = result.full(o.quant, o.kv_type)
        mark = "[bold green]" if o == result.best else ""
        sizes = (full.weights, full.kv_gpu + full.kv_cpu, full.compute_gpu, full.vram)
        table.add_row(
            f"{mark}{o.quant}",
            o.kv_type,
            *(f"{b / MIB:.0f}" for b in sizes),
            f"{o.n_gpu_layers}/{s.n_layer + 1}",
            f"{o.vram / MIB:.0f}",
            f"{o.ram / MIB:.0f}",
        )
    return table


def _layers_table(rows) -> Table:
    table = Table(title=f"{rows[0].quant}, KV {rows[0].kv_type}: every n_gpu_layers")
    for column in ("n_gpu_layers", "VRAM", "RAM"):
        table.add_column(column, justify="right")
    for e in rows:
        table.add_row(str(e.n_gpu_layers), f"{e.vram / MIB:.0f} MiB", f"{e.ram / MIB:.0f} MiB")
    return table


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
