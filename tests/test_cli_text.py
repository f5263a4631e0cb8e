"""The CLI prints user and model text as text: rich markup in it is shown, not read, and long text is cut."""

from __future__ import annotations

from rich.console import Console

import molting.cli as cli
from molting.eval import evaluate
from molting.eval.rubric import Rubric, Sampling, load_rubric
from molting.persona import Persona
from tests.fakes import FakeBackend


def capture(monkeypatch) -> Console:
    console = Console(record=True, width=200, force_terminal=True)
    monkeypatch.setattr(cli, "console", console)
    return console


def test_a_leaked_inst_tag_in_a_reason_is_printed_not_parsed(monkeypatch):
    """The rubric reason "template tokens leaked: [/INST]" once crashed RichUI.table with a MarkupError."""
    persona = Persona.load("examples/claudio")
    full = load_rubric(persona)
    rubric = Rubric(full.version, full.questions[:1], full.known_entities)
    answer = "Sou o Cláudio [/INST] [bold]x[/] [/x]"
    result = evaluate(FakeBackend([answer]), persona, rubric, label="model [/x]", sampling=Sampling(n=1))
    assert any("[/INST]" in reason for reason in result.questions[0].greedy.reasons)
    console = capture(monkeypatch)
    ui = cli.RichUI()
    ui.step("Rubric on [/x] [bold]")
    ui.table(result)
    with ui.bar("rubric: {task} [/x]", 1) as advance:
        advance(1)
    text = console.export_text()
    assert "[/INST]" in text and "model [/x]" in text and "Rubric on [/x] [bold]" in text
    assert "rubric: {task} [/x]" in text


def test_a_megabyte_of_text_is_cut_before_rich_lays_it_out(monkeypatch):
    """rich's highlighter once spent minutes on a 1 MB persona name: only SHOWN characters reach it."""
    console = capture(monkeypatch)
    shown = cli.plain("0x1f " * 200_000 + "[/x]")
    assert len(shown.plain) < cli.SHOWN + 40 and not shown.spans
    console.print(shown)
    assert f"… ({len('0x1f ' * 200_000) + 4 - cli.SHOWN} more characters)" in console.export_text()
