"""PNG charts for reports, drawn with matplotlib (Agg, no display needed).

``loss_chart``: training loss per logged step. ``scores_chart``: per question, one bar per
model (the mean of its answers) with the spread as an error bar. ``drift_chart``: per turn of
the held-out conversations, the share of answers held, one line per model. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot state), and written through ``atomic_path``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from molting.eval.results import LATE_TURN
from molting.io import atomic_path

if TYPE_CHECKING:
    from molting.eval.results import DriftResult, RubricResult

DPI = 110


def loss_chart(loss: Sequence[dict], path: str | Path) -> Path:
    """Write the training loss curve as a PNG.

    Args:
        loss: logged steps, each with ``step`` and ``loss`` (``RunRecord.loss``).
        path: the ``.png`` to write.

    Returns:
        ``path``.

    Raises:
        ValueError: ``loss`` is empty.
    """
    from matplotlib.figure import Figure

    if not loss:
        raise ValueError("no loss was logged: nothing to draw")
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([e["step"] for e in loss], [e["loss"] for e in loss], marker=".", linewidth=1.2)
    axes.set(xlabel="optimizer step", ylabel="training loss", title="Training loss (not the verdict)")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def scores_chart(results: Sequence[RubricResult], path: str | Path) -> Path:
    """Write the per-question rubric scores of several models as one grouped bar chart PNG.

    One group per question, one bar per model: the mean score of the question's answers
    (0-10), with an error bar of ± their spread (clipped to 0-10) when there is more than one answer.

    Args:
        results: results of the same rubric, in legend order (e.g. base, fine-tuned, GGUF).
        path: the ``.png`` to write.

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` is empty.
    """
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results: nothing to draw")
    questions = results[0].questions
    width = 0.8 / len(results)
    figure = Figure(figsize=(max(7.0, 1.1 * len(questions) + 2), 4.2), layout="constrained")
    axes = figure.add_subplot()
    for k, result in enumerate(results):
        by_id = result.by_id()
        means = [by_id[q.id].mean if q.id in by_id else 0.0 for q in questions]
        spreads = [by_id[q.id].spread if q.id in by_id else 0.0 for q in questions]
        # ± spread, clipped to the 0-10 scale a score cannot leave.
        pairs = list(zip(means, spreads, strict=True))
        yerr = [[min(s, m) for m, s in pairs], [min(s, 10 - m) for m, s in pairs]]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(questions))]
        label = f"{result.label} ({result.mean:.1f}/10)"
        axes.bar(xs, means, width, yerr=yerr if any(spreads) else None, capsize=2, label=label)
    axes.set_xticks(range(len(questions)), [textwrap.fill(q.prompt, 14) for q in questions], fontsize=7)
    axes.set(ylim=(0, 10.5), ylabel="score (mean ± spread)", title="Rubric per question")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def drift_chart(results: Sequence[DriftResult], path: str | Path) -> Path:
    """Write the drift curves of several models as a PNG: share of answers held per turn.

    One line per model: the mean share over its runs at each turn (1-based), a band of ± the
    runs' spread, and the greedy run's share as dots.

    Args:
        results: ``molting.eval.conversations.DriftResult`` per model, in legend order.
        path: the ``.png`` to write.

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` is empty.
    """
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results: nothing to draw")
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    axes = figure.add_subplot()
    for result in results:
        turns, greedy, means, spreads = zip(*result.curve(), strict=True)
        late, _ = result.share()
        label = f"{result.label} ({late:.0%} at turns ≥ {LATE_TURN})"
        line = axes.plot(turns, [100 * m for m in means], marker="o", label=label)
        colour = line[0].get_color()
        low = [100 * max(0.0, m - s) for m, s in zip(means, spreads, strict=True)]
        high = [100 * min(1.0, m + s) for m, s in zip(means, spreads, strict=True)]
        axes.fill_between(turns, low, high, color=colour, alpha=0.15)
        axes.scatter(turns, [100 * g for g in greedy], color=colour, marker="x", s=18)
    axes.axvline(LATE_TURN - 0.5, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="turn of the conversation", ylabel="answers held (%)", ylim=(-3, 103))
    axes.set_title("Held-out conversations: drift (line: mean over runs ± spread; x: greedy)", fontsize=9)
    axes.legend(fontsize=7, loc="lower left")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path
