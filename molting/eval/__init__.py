"""Evaluation by what the model generates: a rubric of questions scored by deterministic checks.

``load_rubric`` → ``evaluate`` (one backend, each question ``Sampling.n`` times) →
``RubricResult``; ``compare`` two results to call a regression a regression, ``compare_runs``
over registered runs (``molting compare``), ``retention_table`` across export targets.
Loss is not the verdict (research log, phase 8).
"""

from molting.eval.report import (
    Comparison,
    compare,
    compare_runs,
    phase_table,
    reasons_section,
    retention_table,
    rubric_table,
)
from molting.eval.rubric import (
    Judge,
    Question,
    QuestionResult,
    QuestionScore,
    Rubric,
    RubricResult,
    Sampling,
    default_rubric,
    evaluate,
    load_rubric,
)

__all__ = [
    "Comparison",
    "Judge",
    "Question",
    "QuestionResult",
    "QuestionScore",
    "Rubric",
    "RubricResult",
    "Sampling",
    "compare",
    "compare_runs",
    "default_rubric",
    "evaluate",
    "load_rubric",
    "phase_table",
    "reasons_section",
    "retention_table",
    "rubric_table",
]
