"""Evaluation by what the model generates: a rubric of questions scored by deterministic checks.

``load_rubric`` → ``evaluate`` (one backend) → ``RubricResult``; ``compare`` two results
to call a regression a regression. Loss is not the verdict (research log, phase 8).
"""

from molting.eval.report import Comparison, compare, reasons_section, rubric_table
from molting.eval.rubric import (
    Judge,
    Question,
    QuestionScore,
    Rubric,
    RubricResult,
    default_rubric,
    evaluate,
    load_rubric,
)

__all__ = [
    "Comparison",
    "Judge",
    "Question",
    "QuestionScore",
    "Rubric",
    "RubricResult",
    "compare",
    "default_rubric",
    "evaluate",
    "load_rubric",
    "reasons_section",
    "rubric_table",
]
