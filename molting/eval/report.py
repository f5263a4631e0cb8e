"""Rubric results as markdown, and the comparison of two runs that names a regression.

The research log's phase 8 lost two points (5.5/10 → 3.5/10) while its training loss
fell 35%; ``compare`` exists so that the verdict comes from the answers, the same
way every time.
"""

from __future__ import annotations

from dataclasses import dataclass

from molting.eval.rubric import RubricResult

# A change in the mean score (0-10 per question) smaller than this is noise: one fact more or less.
THRESHOLD = 0.5
# A question that loses this many points is named in the comparison whatever the mean says:
# a wrong-group penalty (-3) or half of a question's facts.
QUESTION_DROP = 3.0
# Failures that make a run a regression whatever the mean says.
CRITICAL_CHECKS = ("leak", "identity")


def rubric_table(results: list[RubricResult]) -> str:
    """A markdown table: one row per question, one score column per result, a total row.

    Args:
        results: results of the same rubric, in column order (e.g. base, fine-tuned, GGUF).
    """
    if not results:
        return ""
    header = "| question | " + " | ".join(r.label for r in results) + " |"
    rows = [header, "|---|" + "---:|" * len(results)]
    by_id = [r.by_id() for r in results]
    for score in results[0].scores:
        cells = [_cell(scores.get(score.id)) for scores in by_id]
        rows.append(f"| {score.prompt} | " + " | ".join(cells) + " |")
    totals = [f"**{r.total:g}/{r.max_total:g}** ({r.mean:.1f}/10)" for r in results]
    rows.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(rows)


def _cell(score) -> str:
    if score is None:
        return "–"
    flags = [name for name in CRITICAL_CHECKS if not score.checks.get(name, True)]
    return f"{score.score:g}" + (f" ({', '.join(flags)})" if flags else "")


def reasons_section(result: RubricResult, max_chars: int = 400) -> str:
    """Per question: the score, why points were lost, and the answer (quoted, shortened)."""
    parts = []
    for score in result.scores:
        answer = score.answer if len(score.answer) <= max_chars else score.answer[:max_chars] + " […]"
        quoted = "\n".join(f"> {line}" for line in answer.splitlines() or [""])
        reasons = "; ".join(score.reasons) or "no points lost"
        parts.append(f"**{score.prompt}** — {score.score:g}/10: {reasons}\n\n{quoted}\n")
    return "\n".join(parts)


@dataclass
class Comparison:
    """``after`` judged against ``before`` on the same rubric.

    Attributes:
        verdict: "regression", "improvement" or "unchanged".
        delta: change of the mean score per question (0-10 scale).
        rows: ``(question, before, after)`` scores, questions in ``before``'s order.
        new_failures: ``"question: check"`` for leak/identity checks that passed before
            and fail after; any one makes the verdict a regression.
        drops: ``(question, delta)`` for questions that lost ``QUESTION_DROP`` points or
            more; named next to the verdict, which they do not change.
    """

    before: RubricResult
    after: RubricResult
    verdict: str
    delta: float
    rows: list[tuple[str, float, float]]
    new_failures: list[str]
    drops: list[tuple[str, float]]

    def to_markdown(self) -> str:
        """A verdict line and a per-question before/after/Δ table."""
        b, a = self.before, self.after
        lines = [
            f"**{self.verdict.upper()}**: {a.label} {a.mean:.1f}/10 vs {b.label} {b.mean:.1f}/10 "
            f"({self.delta:+.1f} per question).",
        ]
        if self.new_failures:
            lines.append("New critical failures: " + "; ".join(self.new_failures) + ".")
        if self.drops:
            lines.append("Worse on: " + "; ".join(f"{q} ({d:+g})" for q, d in self.drops) + ".")
        lines += ["", f"| question | {b.label} | {a.label} | Δ |", "|---|---:|---:|---:|"]
        lines += [f"| {q} | {x:g} | {y:g} | {y - x:+g} |" for q, x, y in self.rows]
        return "\n".join(lines)


def compare(before: RubricResult, after: RubricResult, threshold: float = THRESHOLD) -> Comparison:
    """Judge ``after`` against ``before``.

    Regression: the mean fell by ``threshold`` or more, or a question newly leaks
    template tokens or loses the persona's identity. Improvement: the mean rose by
    ``threshold`` or more with no new critical failure. Otherwise unchanged.

    Raises:
        ValueError: the two results are of different rubric versions or questions.
    """
    if before.version != after.version or set(before.by_id()) != set(after.by_id()):
        raise ValueError(
            f"cannot compare {before.label!r} (rubric {before.version}) with {after.label!r} "
            f"(rubric {after.version}): not the same questions"
        )
    after_by_id = after.by_id()
    rows, new_failures = [], []
    for old in before.scores:
        new = after_by_id[old.id]
        rows.append((old.prompt, old.score, new.score))
        for name in CRITICAL_CHECKS:
            if old.checks.get(name, True) and not new.checks.get(name, True):
                new_failures.append(f"{old.prompt}: {name}")
    delta = round(after.mean - before.mean, 2)
    if new_failures or delta <= -threshold:
        verdict = "regression"
    elif delta >= threshold:
        verdict = "improvement"
    else:
        verdict = "unchanged"
    drops = [(q, y - x) for q, x, y in rows if y - x <= -QUESTION_DROP]
    return Comparison(before, after, verdict, delta, rows, new_failures, drops)
