"""Progress when the output is not a terminal: plain lines at intervals, with the time left."""

import io

from rich.console import Console

from molting import cli


def test_progress_line_estimates_the_time_left_from_the_steps_done():
    assert cli.progress_line("training", 12, 133, 65.0) == (
        "training: step 12/133, 1 min 05 s elapsed, about 10 min 55 s left"
    )
    assert cli.progress_line("training", 0, None, 3.2) == "training: step 0/?, 3 s elapsed"
    assert cli.progress_line("training", 133, 133, 7300) == "training: step 133/133, 2 h 01 min elapsed"


def test_a_bar_prints_plain_lines_at_intervals_when_the_output_is_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, force_terminal=False, width=200))
    now = [0.0]
    monkeypatch.setattr(cli, "_PlainProgress", lambda title, total: _Clocked(title, total, now))
    with cli.RichUI().bar("training", None) as advance:
        for step in range(1, 11):
            now[0] = step * 10.0  # 10 s per step: a line every 30 s
            advance(step, 10)
    lines = out.getvalue().splitlines()
    assert lines == [
        "training: step 3/10, 30 s elapsed, about 1 min 10 s left",
        "training: step 6/10, 1 min 00 s elapsed, about 40 s left",
        "training: step 9/10, 1 min 30 s elapsed, about 10 s left",
        "training: step 10/10, 1 min 40 s elapsed",
    ]


_REAL = cli._PlainProgress


def _Clocked(title, total, now):
    return _REAL(title, total, interval=30.0, clock=lambda: now[0])
