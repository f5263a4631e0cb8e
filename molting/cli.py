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

from molting.backends.base import GenerationConfig
from molting.errors import ConfigError, Interrupted, MoltingError
from molting.eval.conversations import DRIFT_MAX_NEW_TOKENS, DRIFT_SAMPLING
from molting.eval.rubric import Sampling

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
Base = Annotated[str, typer.Option("--base", help="embedded model name or local model directory")]
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


class RichUI:
    """Progress for the library's long steps, drawn with rich."""

    def step(self, title: str) -> None:
        console.rule(plain(title, "bold"))

    @contextlib.contextmanager
    def bar(self, title: str, total: int | None):
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
        from molting.eval.report import score_cell

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

    Exits with 1 when the lint finds an error (see ``molting.data.lint_dataset``).
    """
    from transformers import AutoTokenizer

    from molting.data import lint_persona, token_budget
    from molting.eval.conversations import load_conversations
    from molting.models import resolve_base_model
    from molting.persona import Persona
    from molting.preferences import preference_budget
    from molting.train import TrainConfig

    max_length = max_length or TrainConfig.max_length
    try:
        persona = Persona.load(persona_dir)
        tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base))
    except MoltingError as exc:
        _fail(exc)
    pairs = f", {len(persona.preferences)} preference pairs" if persona.preferences else ""
    console.print(plain(f"{persona.name}: {len(persona.examples)} examples{pairs}, language {persona.language}"))
    budgets = {}
    for label, prompt in (("training", persona.train_system_prompt), ("inference", persona.system_prompt)):
        console.print(plain(f"{label} system prompt", "bold"))
        budgets[label] = token_budget(tokenizer, persona.examples, prompt, max_length)
        RichUI().budget(budgets[label])
    pair_budget = None
    if persona.preferences:
        pair_budget = preference_budget(tokenizer, persona.preferences, persona.train_system_prompt, max_length)
        s = pair_budget.summary()
        console.print(
            f"preference pairs (training system prompt): tokens min {s['tokens_min']}, median "
            f"{s['tokens_median']}, max {s['tokens_max']}; truncated: {s['truncated_examples']}"
        )
    try:
        findings = lint_persona(persona, budgets["training"], pair_budget)
        scripts = load_conversations(persona)
    except MoltingError as exc:
        _fail(exc)
    if scripts is not None:
        _conversation_budget(tokenizer, persona, scripts, max_new_tokens, resolve_base_model(base))
    RichUI().lint(findings)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(code=1)


def _conversation_budget(tokenizer, persona, scripts, max_new_tokens: int, model_dir) -> None:
    """Print the longest held-out conversation's tokens against the model's and llama.cpp's context."""
    from transformers import AutoConfig

    from molting.eval.conversations import longest_conversation
    from molting.pipeline import RunConfig

    cid, tokens = longest_conversation(tokenizer, persona.system_prompt, scripts, max_new_tokens)
    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    n_ctx = RunConfig.n_ctx
    console.print(
        f"held-out conversations: {len(scripts.scripts)}; the longest ({cid}) reaches {tokens} tokens with "
        f"answers of {max_new_tokens} tokens (inference system prompt); the model's context: {context} tokens, "
        f"molting run's llama.cpp n_ctx: {n_ctx}",
        markup=False,
        highlight=False,
    )
    if tokens > min(c for c in (context, n_ctx) if c):
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
) -> None:
    """Lint the persona's dataset, then fine-tune on it: every weight of a small model, else a LoRA adapter
    (--finetuning); --method dpo: then DPO on its preferences."""
    from molting import registry
    from molting.data import lint_persona, raise_on_lint_errors
    from molting.io import check_writable_dir
    from molting.persona import Persona
    from molting.train import resolve_config, training_budget, training_pair_budget
    from molting.train import train as run_training

    ui = RichUI()
    try:
        persona = Persona.load(persona_dir)
        config = _train_config(base, epochs, r, lora_alpha, lr, max_length, quantization, method, finetuning)
        if sft_adapter is not None:
            config = replace(config, sft_adapter=str(sft_adapter))
        config = resolve_config(config)
        out = out or Path("runs") / persona.slug
        check_writable_dir(out, "--out")
        check_writable_dir(runs, "--runs")
        budget = training_budget(persona, config)
        findings = lint_persona(persona, budget, training_pair_budget(persona, config))
        ui.lint(findings)
        raise_on_lint_errors(findings)
        ui.budget(budget)
        with ui.bar("training", None) as advance:
            record = run_training(persona, out, config, on_step=lambda s, n, logs: advance(s, n))
        weights = out / ("model" if config.finetuning == "full" else "adapter")
        artifacts = {"adapter": weights, "run_json": out / "run.json"}
        entry = registry.record(
            runs, persona, "train", registry.config_dict(train=config), artifacts=artifacts, loss=record.loss
        )
    except MoltingError as exc:
        _fail(exc)
    if record.dpo:
        last = record.dpo[-1]
        console.print(
            f"DPO: {len(record.dpo)} steps, {record.dpo_seconds:.0f} s; last step: loss {last['loss']:.3f}, "
            f"rewards/margins {last.get('rewards/margins', float('nan')):.3f}, "
            f"rewards/accuracies {last.get('rewards/accuracies', float('nan')):.2f}"
        )
    console.print(
        plain(
            f"{weights.name}: {weights}  ({record.train_seconds:.0f} s, "
            f"{record.peak_memory_mb:.0f} MiB peak {record.peak_memory_kind})\nregistered: {entry.root}",
            limit=4 * SHOWN,
        )
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
    judge: Annotated[str, typer.Option(help="a second opinion: this model also grades the answers")] = None,
    probes: Annotated[
        bool, typer.Option(help="also ask the persona's held-out probes (probes.yaml), one greedy answer each")
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

    from molting import registry
    from molting.backends import load_backend
    from molting.eval import load_rubric, retention_table
    from molting.eval.conversations import drift_table, load_conversations
    from molting.eval.probes import load_probes, probes_table
    from molting.eval.targets import evaluate_targets, target_labels, training_config
    from molting.io import atomic_path, check_output_file, check_writable_dir
    from molting.persona import Persona

    ui = RichUI()
    try:
        check_writable_dir(runs, "--runs")
        if out:
            check_output_file(out, force=True)
        persona = Persona.load(persona_dir)
        rubric = load_rubric(persona)
        models = model or [str(persona.default_model())]
        labels = target_labels(models, label)
        config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        sampling = Sampling(n=samples)
        targets = dict(zip(labels, models, strict=True))
        opener = {lab: (lambda m=m: load_backend(m)) for lab, m in targets.items()}
        probe_set = load_probes(persona) if probes else None
        probe_config = replace(config, max_new_tokens=min(max_new_tokens, probe_max_new_tokens))
        scripts = load_conversations(persona) if conversations else None
        drift = (replace(config, max_new_tokens=drift_max_new_tokens), Sampling(n=drift_samples))
        results = evaluate_targets(
            persona, rubric, opener, config, sampling, ui, probe_set, probe_config, scripts, *drift
        )
        settings = registry.config_dict(
            generation=config, sampling=sampling, models=targets, train=training_config(models[0])
        )
        entry = registry.record(runs, persona, "eval", settings, results)
    except MoltingError as exc:
        _fail(exc)
    for result in results:
        ui.table(result)
    if len(results) > 1:
        console.rule(plain(f"retention against {results[0].label}", "bold"))
        console.print(Markdown(retention_table(results)))
    if probed := [p for result in results for p in result.probes]:
        console.rule("[bold]held-out probes (pass / asked)")
        console.print(Markdown(probes_table(probed)))
    if drifts := [result.drift for result in results if result.drift is not None]:
        console.rule("[bold]held-out conversations: answers held per turn (drift)")
        console.print(Markdown(drift_table(drifts)))
    console.print(plain(f"registered: {entry.root}"))
    data = [r.to_dict() for r in results]
    if judge:
        for result, saved in zip(results, data, strict=True):
            saved["judge"] = _second_opinion(judge, persona, rubric, result)
    if out:
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

    from molting import registry

    try:
        text = registry.comparison(run, runs, model)
    except (MoltingError, ValueError) as exc:
        _fail(exc)
    console.print(Markdown(text))
    if out:
        out.write_text(text, encoding="utf-8")


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
    table = Table(title=plain(f"{result.label}: molting's score beside {judge}'s (a second opinion, not the score)"))
    for column in ("question", "molting", "judge", "judge's reply"):
        table.add_column(column)
    for scored, opinion in zip((q.greedy for q in result.questions), opinions, strict=True):
        shown = "unreadable" if opinion.score is None else f"{opinion.score:g}"
        table.add_row(plain(scored.prompt), f"{scored.score:g}", shown, plain(opinion.reply.strip(), limit=120))
    console.print(table)
    return {"model": judge, "opinions": [asdict(o) for o in opinions]}


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
    import tempfile

    from molting.export import merge_adapter
    from molting.export.verify import VerifyConfig
    from molting.io import check_output_file
    from molting.models import resolve_base_model
    from molting.persona import Persona
    from molting.pipeline import export_adapter_gguf, export_gguf

    ui = RichUI()
    try:
        check_output_file(out, [adapter, *_base_inputs(base)], force=force, magic=b"GGUF")
        persona = Persona.load(persona_dir)
        verify = None if no_verify else VerifyConfig()
        full = not (adapter / "adapter_config.json").is_file() and (adapter / "config.json").is_file()
        if adapter_only and full:
            raise ConfigError(f"{adapter}: a fully fine-tuned model has no LoRA adapter (train with --finetuning lora)")
        if adapter_only:
            export_adapter_gguf(persona, resolve_base_model(base), adapter, out, ui, verify=verify)
            console.print(plain(f"wrote {out}: apply it to the base's GGUF with `llama-cli -m BASE.gguf --lora {out}`"))
            return
        if full:
            result = export_gguf(persona, adapter, out, quant, ui, verify=verify)
        else:
            with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
                ui.step("Merging the adapter into a full-precision copy of the base")
                merged = merge_adapter(resolve_base_model(base), adapter, Path(tmp) / "merged")
                result = export_gguf(persona, merged, out, quant, ui, verify=verify)
    except MoltingError as exc:
        _fail(exc)
    console.print(plain(f"wrote {result.path} ({result.quant})"))


def _base_inputs(base: str) -> list[Path]:
    """The files a ``--base`` reads: its directory, or an embedded model's GGUF."""
    from molting.models import EMBEDDED, embedded_gguf

    return [embedded_gguf(base)] if base in EMBEDDED else [Path(base)]


@app.command()
def chat(
    persona_dir: PersonaDir,
    message: Annotated[str, typer.Argument(help="one message; omit for an interactive session")] = None,
    model: Annotated[str, typer.Option(help="GGUF file, model/adapter/run directory or embedded name")] = None,
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
    from molting.persona import Persona

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
    from molting.persona import Persona
    from molting.pipeline import RunConfig, run

    try:
        persona = Persona.load(persona_dir)
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
        result = run(persona, config, RichUI())
    except MoltingError as exc:
        _fail(exc)
    console.rule("[bold green]done")
    paths = f"report:  {result.report}\nadapter: {result.adapter}\nGGUF:    {result.gguf}"
    console.print(plain(paths, limit=4 * SHOWN))
    console.print(plain(f"registered: {result.entry}"))


@app.command()
def bench(
    model: Annotated[
        list[str], typer.Option(help="embedded name, reference name (random weights) or model directory")
    ] = None,
    engine: Annotated[list[str], typer.Option(help="transformers, llama.cpp, 'llama.cpp raw' [default: all]")] = None,
    quant: Annotated[list[str], typer.Option(help="GGUF quantizations for llama.cpp")] = None,
    dtype: Annotated[str, typer.Option(help="transformers weights: fp32, bf16 or 4bit")] = "fp32",
    repeats: Annotated[int, typer.Option(help="runs per case, each in a fresh process")] = 3,
    n_prompt: Annotated[int, typer.Option(help="prompt tokens")] = 512,
    n_new: Annotated[int, typer.Option(help="tokens to generate")] = 128,
    n_ctx: Annotated[int, typer.Option(help="llama.cpp context window")] = 2048,
    threads: Annotated[int, typer.Option(help="CPU threads for every engine [default: engine defaults]")] = None,
    n_gpu_layers: Annotated[int, typer.Option(help="llama.cpp layers on the GPU (-1 = all)")] = 0,
    repack: Annotated[
        bool, typer.Option(help="llama.cpp's CPU weight repacking (AMX, Q4_K x8); --no-repack where it traps")
    ] = True,
    cache: Annotated[Path, typer.Option(help="where built models and GGUFs are kept")] = None,
    out: Annotated[Path, typer.Option(help="report path without suffix: .md, .json and .png are written")] = Path(
        "benchmarks/reports/bench"
    ),
) -> None:
    """Measure load time, memory, TTFT, prefill and decode speed of every engine x model x quantization."""
    import subprocess

    from molting.bench import BenchConfig, report
    from molting.bench import bench as run_bench

    options = dict(
        dtype=dtype,
        repeats=repeats,
        n_prompt=n_prompt,
        n_new=n_new,
        n_ctx=n_ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        repack=repack,
    )
    optional = dict(models=model, engines=engine, quants=quant, cache=cache)
    config = BenchConfig(**options, **{k: tuple(v) if isinstance(v, list) else v for k, v in optional.items() if v})
    try:
        result = run_bench(config, progress=lambda line: console.print(plain(line, "dim")))
    except MoltingError as exc:
        _fail(exc)
    except subprocess.CalledProcessError as exc:
        hint = " (an illegal instruction: try --no-repack)" if exc.returncode == -signal.SIGILL else ""
        console.print(f"[bold red]error:[/] a benchmark worker failed with status {exc.returncode}{hint}")
        raise typer.Exit(code=1) from None
    console.print(report.table(result), soft_wrap=True, markup=False)
    for line in result.skipped:
        console.print(Text.assemble(("not measured: ", "yellow"), plain(line)))
    console.print(plain("wrote " + ", ".join(str(p) for p in report.write(result, out)), limit=4 * SHOWN))


@app.command()
def fit(
    model: Annotated[
        str, typer.Argument(help="GGUF file, model directory, or phi-3-mini / tinyllama-1.1b / smollm2-135m")
    ],
    vram: Annotated[str, typer.Option(help="GPU memory, e.g. 4GiB")] = "4GiB",
    ctx: Annotated[int, typer.Option(help="context window n_ctx, tokens")] = 2048,
    reserve: Annotated[str, typer.Option(help="VRAM for the CUDA context and pools")] = "512MiB",
    layers: Annotated[bool, typer.Option(help="also print every n_gpu_layers of the best plan")] = False,
    repack: Annotated[
        bool, typer.Option(help="count llama.cpp's CPU weight repacking in RAM; --no-repack as in molting bench")
    ] = True,
) -> None:
    """Estimate llama.cpp's memory per quantization, KV cache type and offloaded layers; print the best plan."""
    from molting import fit as planner

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


def _fit_table(result) -> Table:
    from molting.fit import MIB

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
    from molting.fit import MIB

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
