"""Rubric results as markdown: side-by-side tables, the comparison that names a regression,
the research log's phase table over several runs, and retention across export targets.

The research log's phase 8 lost two points (5.5/10 → 3.5/10) while its training loss
fell 35%; ``compare`` exists so that the verdict comes from the answers, the same
way every time. With several answers per question (``molting.eval.rubric.Sampling``)
it also knows how far a score moves by chance, and calls a change only beyond that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from molting.eval.conversations import compare_drift, drift_table
from molting.eval.probes import of_split, probes_table
from molting.eval.results import NOISE_Z, QuestionResult, RubricResult

# A change in the mean score (0-10 per question) smaller than this is noise: one fact more or less.
THRESHOLD = 0.5
# A question whose mean moves by less than this shows "=" in trend columns (the log's "=", "+1", "-2").
QUESTION_CHANGE = 1.0
# A question that loses this many points is named in the comparison whatever the mean says:
# a wrong-group penalty (-3) or half of a question's facts.
QUESTION_DROP = 3.0
# Failures that make a run a regression whatever the mean says, when the greedy answer (the one
# ``Persona.chat`` gives) newly fails one, or the share of a question's answers failing it grows
# by at least CRITICAL_SHARE (2 of 3 samples).
CRITICAL_CHECKS = ("leak", "identity")
CRITICAL_SHARE = 0.5


def score_cell(question: QuestionResult | None) -> str:
    """``"6.3 ± 1.2"`` (mean ± spread over the answers), ``"6.3"`` with one answer, ``"–"`` if missing."""
    if question is None:
        return "–"
    text = f"{question.mean:.1f}" if question.n > 1 else f"{question.mean:g}"
    return text + (f" ± {question.spread:.1f}" if question.n > 1 else "")


def critical_flags(question: QuestionResult) -> list[str]:
    """The CRITICAL_CHECKS failed by at least half of the question's answers."""
    return [name for name in CRITICAL_CHECKS if question.failure_share(name) >= CRITICAL_SHARE]


def _cell(question: QuestionResult | None) -> str:
    flags = critical_flags(question) if question is not None else []
    return score_cell(question) + (f" ({', '.join(flags)})" if flags else "")


def _total_cell(result: RubricResult) -> str:
    noise = f" ± {result.noise:.1f}" if result.noise else ""
    return f"**{result.total:g}/{result.max_total:g}** ({result.mean:.1f}{noise}/10)"


def rubric_table(results: list[RubricResult]) -> str:
    """A markdown table: one row per question, one score column per result, a total row.

    A cell is the mean ± spread of the question's answers, followed by the critical checks
    (``leak``, ``identity``) that at least half of them failed. The total row gives the sum
    of means and the mean per question ± its standard error (``RubricResult.noise``).

    Args:
        results: results of the same rubric, in column order (e.g. base, fine-tuned, GGUF).
    """
    if not results:
        return ""
    rows = ["| question | " + " | ".join(r.label for r in results) + " |", "|---|" + "---:|" * len(results)]
    by_id = [r.by_id() for r in results]
    for question in results[0].questions:
        rows.append(f"| {question.prompt} | " + " | ".join(_cell(q.get(question.id)) for q in by_id) + " |")
    rows.append("| **total** | " + " | ".join(_total_cell(r) for r in results) + " |")
    return "\n".join(rows)


def reasons_section(result: RubricResult, max_chars: int = 400) -> str:
    """Per question: the mean, then each answer with its score, why points were lost, and the text."""
    parts = []
    for question in result.questions:
        parts.append(f"**{question.prompt}** — {score_cell(question)}/10\n")
        for k, answer in enumerate(question.answers):
            text = answer.answer if len(answer.answer) <= max_chars else answer.answer[:max_chars] + " […]"
            quoted = "\n".join(f"> {line}" for line in text.splitlines() or [""])
            name = "answer" if question.n == 1 else "greedy" if k == 0 else f"sample {k}"
            reasons = "; ".join(answer.reasons) or "no points lost"
            parts.append(f"*{name}* — {answer.score:g}/10: {reasons}\n\n{quoted}\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class QuestionChange:
    """One question's mean before and after, and whether the move is beyond noise.

    Attributes:
        noise: ``NOISE_Z`` standard errors of the difference of the two means,
            ``sqrt(s_b**2 / n_b + s_a**2 / n_a)`` from the answers' spreads; 0 with one answer each.
    """

    prompt: str
    before: QuestionResult
    after: QuestionResult

    @property
    def delta(self) -> float:
        """Change of the question's mean score, in points."""
        return round(self.after.mean - self.before.mean, 2)

    @property
    def noise(self) -> float:
        b, a = self.before, self.after
        return round(NOISE_Z * math.sqrt(b.spread**2 / b.n + a.spread**2 / a.n), 2)

    @property
    def trend(self) -> int:
        """+1 or -1 when ``|delta|`` reaches both QUESTION_CHANGE and ``noise``, else 0."""
        if abs(self.delta) < max(QUESTION_CHANGE, self.noise):
            return 0
        return 1 if self.delta > 0 else -1

    def trend_cell(self) -> str:
        """The log's trend column: ``"+1.3"``, ``"-2"``, or ``"="`` when the move is within noise."""
        return f"{round(self.delta, 1):+g}" if self.trend else "="


@dataclass
class Comparison:
    """``after`` judged against ``before`` on the same rubric.

    Attributes:
        verdict: "regression", "improvement" or "unchanged".
        delta: change of the mean score per question (0-10 scale).
        band: the smallest change of the mean called a change: ``threshold``, or ``NOISE_Z``
            standard errors of the difference when the answers' spread makes that larger.
        rows: one QuestionChange per question, in ``before``'s order.
        new_failures: ``"question: check"`` for leak/identity checks that the greedy answer
            newly fails, or whose share of failing answers grew by CRITICAL_SHARE or more; any
            one makes the verdict a regression.
        drops: ``(question, delta)`` for questions that lost ``QUESTION_DROP`` points or more
            (and more than their noise); named next to the verdict, which they do not change.
    """

    before: RubricResult
    after: RubricResult
    verdict: str
    delta: float
    band: float
    rows: list[QuestionChange]
    new_failures: list[str]
    drops: list[tuple[str, float]]

    def summary(self) -> str:
        """The verdict line, e.g. ``**REGRESSION**: GGUF 3.1/10 vs fine-tuned 5.0/10 (-1.9 per question, ...)``."""
        b, a = self.before, self.after
        return (
            f"**{self.verdict.upper()}**: {a.label} {a.mean:.1f}/10 vs {b.label} {b.mean:.1f}/10 "
            f"({self.delta:+.1f} per question; changes under ±{self.band:.1f} are noise)."
        )

    def to_markdown(self) -> str:
        """The verdict line, critical failures and drops, and a per-question before/after/Δ table."""
        b, a = self.before, self.after
        lines = [self.summary()]
        if self.new_failures:
            lines.append("New critical failures: " + "; ".join(self.new_failures) + ".")
        if self.drops:
            lines.append("Worse on: " + "; ".join(f"{q} ({d:+g})" for q, d in self.drops) + ".")
        lines += ["", f"| question | {b.label} | {a.label} | Δ |", "|---|---:|---:|---:|"]
        for row in self.rows:
            delta = f"{row.delta:+g}" + ("" if row.trend or not row.delta else " (noise)")
            lines.append(f"| {row.prompt} | {score_cell(row.before)} | {score_cell(row.after)} | {delta} |")
        return "\n".join(lines)


def compare(before: RubricResult, after: RubricResult, threshold: float = THRESHOLD) -> Comparison:
    """Judge ``after`` against ``before``.

    Regression: the mean fell by the band or more (``threshold``, or ``NOISE_Z`` standard
    errors of the difference if larger), or a question newly leaks template tokens or loses
    the persona's identity (in its greedy answer, or in CRITICAL_SHARE more of its answers).
    Improvement: the mean rose by the band or more with no new critical failure. Otherwise
    unchanged: a move within the answers' own spread is not called a change.

    Raises:
        ValueError: the two results are of different rubric versions or questions.
    """
    if before.version != after.version or set(before.by_id()) != set(after.by_id()):
        raise ValueError(
            f"cannot compare {before.label!r} (rubric {before.version}) with {after.label!r} "
            f"(rubric {after.version}): not the same questions"
        )
    after_by_id = after.by_id()
    rows = [QuestionChange(old.prompt, old, after_by_id[old.id]) for old in before.questions]
    new_failures = [f"{row.prompt}: {name}" for row in rows for name in CRITICAL_CHECKS if _newly_fails(row, name)]
    delta = round(after.mean - before.mean, 2)
    band = round(max(threshold, NOISE_Z * math.hypot(before.noise, after.noise)), 2)
    if new_failures or delta <= -band:
        verdict = "regression"
    elif delta >= band:
        verdict = "improvement"
    else:
        verdict = "unchanged"
    drops = [(row.prompt, row.delta) for row in rows if row.delta <= -max(QUESTION_DROP, row.noise)]
    return Comparison(before, after, verdict, delta, band, rows, new_failures, drops)


def _newly_fails(row: QuestionChange, check: str) -> bool:
    """The greedy answer (what ``Persona.chat`` answers) newly fails ``check``, or the share of
    failing answers grew by CRITICAL_SHARE or more."""
    greedy = row.before.greedy.checks.get(check, True) and not row.after.greedy.checks.get(check, True)
    return greedy or row.after.failure_share(check) - row.before.failure_share(check) >= CRITICAL_SHARE


def phase_table(results: list[RubricResult]) -> str:
    """The research log's phase table: one row per question, one column per run, and the trend.

    The trend column is the last run against the one before (``QuestionChange.trend_cell``:
    ``"="`` within noise); the total row gives each run's mean per question, the trend of
    that mean, and ``=`` when the comparison calls it unchanged.

    Args:
        results: results of the same rubric, oldest first, each labelled by its run.

    Raises:
        ValueError: fewer than two results, or not the same questions.
    """
    if len(results) < 2:
        raise ValueError(f"a phase table needs at least two runs, got {len(results)}")
    last = compare(results[-2], results[-1])
    by_id = [r.by_id() for r in results]
    rows = [
        "| question | " + " | ".join(r.label for r in results) + " | trend |",
        "|---|" + "---:|" * (len(results) + 1),
    ]
    for change in last.rows:
        qid = change.before.id
        cells = " | ".join(_cell(scores.get(qid)) for scores in by_id)
        rows.append(f"| {change.prompt} | {cells} | {change.trend_cell()} |")
    totals = " | ".join(_total_cell(r) for r in results)
    trend = "=" if last.verdict == "unchanged" else f"{last.delta:+.1f}"
    rows.append(f"| **total** | {totals} | **{trend}** |")
    return "\n".join(rows)


def settings_table(labels: list[str], settings: list[dict]) -> str:
    """A markdown table of the settings that differ between runs (the log's "Changes from Phase 8").

    Args:
        labels: one column name per run.
        settings: one flat ``{name: value}`` dict per run, in the same order.

    Returns:
        The table, or a sentence saying the runs share every setting.
    """
    names = sorted({name for s in settings for name in s})
    differing = [n for n in names if len({repr(s.get(n)) for s in settings}) > 1]
    if not differing:
        return "Every recorded setting is the same in these runs."
    rows = ["| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    rows += [f"| {n} | " + " | ".join(_setting(s.get(n)) for s in settings) + " |" for n in differing]
    return "\n".join(rows)


def _setting(value: object) -> str:
    text = "–" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def compare_runs(results: list[RubricResult], settings: list[dict] | None = None) -> str:
    """``molting compare``: what changed between runs, the phase table, and a verdict per step.

    Args:
        results: one result per run, oldest first, labelled by run.
        settings: one flat settings dict per run (``settings_table``), or None to leave that out.

    Returns:
        Markdown; its last paragraph is the verdict of the last run against the one before.
    """
    parts = []
    if settings is not None:
        parts += ["## Changes\n", settings_table([r.label for r in results], settings), ""]
    parts += ["## Rubric per question\n", phase_table(results), ""]
    for split, title in (("test", "Test probes, the headline"), ("dev", "Dev probes, used to choose recipes")):
        found = [of_split(r.probes, split) for r in results]
        if all(found):
            probed = [replace(p, label=r.label) for p, r in zip(found, results, strict=True)]
            parts += [f"## {title} (pass / asked)\n", probes_table(probed), ""]
    drifts = [replace(r.drift, label=r.label) for r in results if r.drift is not None]
    if len(drifts) == len(results):
        parts += ["## Drift: held-out conversations\n", drift_table(drifts), ""]
    steps = [compare(before, after) for before, after in zip(results, results[1:], strict=False)]
    parts += ["## Verdict\n"]
    parts += [f"- {step.summary()}" + _named(step) for step in steps]
    if len(drifts) == len(results):
        parts += [f"- {compare_drift(b, a).summary()}" for b, a in zip(drifts, drifts[1:], strict=False)]
    best = max(results, key=lambda r: r.mean)
    parts += ["", f"Best run: {best.label} ({best.mean:.1f}/10). Verdict: {steps[-1].summary()}"]
    return "\n".join(parts) + "\n"


def _named(step: Comparison) -> str:
    named = [f"{f} newly fails" for f in step.new_failures] + [f"{q} {round(d, 1):+g}" for q, d in step.drops]
    return (" " + "; ".join(named) + ".") if named else ""


def retention_table(results: list[RubricResult]) -> str:
    """Several models side by side, each judged against the first (e.g. fine-tuned, F16, Q8_0, Q4_K_M).

    Cells are mean ± spread; a ▼ or ▲ marks a question that moved beyond its noise
    (``QuestionChange.trend``) relative to the first column. Below: the mean per question,
    retention (mean / first mean), and each column's verdict against the first.

    Args:
        results: results of the same rubric; the first is the reference.

    Returns:
        Markdown: the table, then one line per changed question.
    """
    reference, others = results[0], results[1:]
    steps = [compare(reference, other) for other in others]
    rows = ["| question | " + " | ".join(r.label for r in results) + " |", "|---|" + "---:|" * len(results)]
    for i, question in enumerate(reference.questions):
        cells = [_cell(question)] + [_cell(step.rows[i].after) + _arrow(step.rows[i]) for step in steps]
        rows.append(f"| {question.prompt} | " + " | ".join(cells) + " |")
    rows.append("| **mean /10** | " + " | ".join(_total_cell(r) for r in results) + " |")
    rows.append("| **retention** | 100% | " + " | ".join(_retention(reference, r) for r in others) + " |")
    rows.append("| **verdict** | reference | " + " | ".join(s.verdict.upper() for s in steps) + " |")
    changed = [
        f"- {step.after.label}: {row.prompt} {score_cell(row.before)} → {score_cell(row.after)} ({row.delta:+g})"
        for step in steps
        for row in step.rows
        if row.trend
    ]
    changed += [f"- {step.after.label}: {failure} newly fails" for step in steps for failure in step.new_failures]
    tail = ["", f"Questions that changed against {reference.label}:", *changed] if changed else []
    return "\n".join(rows + tail)


def _arrow(change: QuestionChange) -> str:
    return {1: " ▲", -1: " ▼"}.get(change.trend, "")


def _retention(reference: RubricResult, result: RubricResult) -> str:
    return f"{result.mean / reference.mean:.0%}" if reference.mean else "–"
