"""PNG charts for reports, drawn with matplotlib (Agg, no display needed).

``loss_chart``: training loss per logged step. ``scores_chart``: per question, one bar per
model (the mean of its answers) with the spread as an error bar. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot state), and written through ``atomic_path``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from molting.io import atomic_path

if TYPE_CHECKING:
    from molting.eval.rubric import RubricResult

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


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path
