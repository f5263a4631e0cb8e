"""What an evaluation returns: the rubric's scored answers and the probes' verdicts.

The rubric (``molting.eval.rubric``) and the held-out probes (``molting.eval.probes``) both
produce these; a ``RubricResult`` carries the same model's ``ProbeResult`` list, so the two
modules share them here rather than importing each other. Every type round-trips through
``to_dict``/``from_dict`` (the run registry and ``eval/*.json`` hold them as JSON).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

# Points of a perfect answer to one rubric question.
MAX_SCORE = 10.0


@dataclass
class QuestionScore:
    """One answer to a question and its score (``Judge.score``).

    Attributes:
        score: 0-10, one decimal.
        reasons: why points were lost, one short phrase each; empty when none were.
        checks: check name -> passed (``leak``, ``identity``, ``facts``, ``wrong``,
            ``language``, ``truncated``, ``repetition``, ``entities``, ``fluency``, ``mixed``,
            ``copying``, ``second-person``, ``repeats``, ``muddled``, ``contradiction``).
        finish_reason: the backend's, "stop" or "length".
    """

    id: str
    prompt: str
    answer: str
    score: float
    reasons: list[str]
    checks: dict[str, bool]
    finish_reason: str | None = None


@dataclass
class QuestionResult:
    """A question answered ``n`` times (greedy first, then seeded samples), each answer scored.

    Attributes:
        answers: one QuestionScore per answer, in the order asked: ``answers[0]`` is the
            answer decoded with the evaluation's GenerationConfig as given (greedy by default).
    """

    id: str
    prompt: str
    answers: list[QuestionScore]

    @property
    def n(self) -> int:
        """Number of answers."""
        return len(self.answers)

    @property
    def mean(self) -> float:
        """Mean score over the answers, 0-10."""
        return round(statistics.fmean(a.score for a in self.answers), 2)

    @property
    def spread(self) -> float:
        """Sample standard deviation of the answers' scores (0 with a single answer), in points."""
        return round(statistics.stdev(a.score for a in self.answers), 2) if self.n > 1 else 0.0

    @property
    def greedy(self) -> QuestionScore:
        """The first answer: the one decoded as configured (greedy by default)."""
        return self.answers[0]

    def failure_share(self, check: str) -> float:
        """Share of the answers, 0-1, that failed ``check`` (a check an answer skipped counts as passed)."""
        return sum(not a.checks.get(check, True) for a in self.answers) / self.n


@dataclass
class RubricResult:
    """One model's answers to a rubric, scored. ``label`` names the model ("base", "GGUF Q4_K_M").

    Attributes:
        questions: per question, every answer and its score, in the rubric's order.
        sampling: how the answers were drawn (``Sampling`` as a dict); empty when unknown.
        probes: the same model's held-out probes (``ProbeResult``), with the
            persona's system prompt first and, where run, without it; empty when not run.
    """

    label: str
    version: str
    questions: list[QuestionResult]
    sampling: dict = field(default_factory=dict)
    probes: list[ProbeResult] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Sum of the questions' mean scores."""
        return round(sum(q.mean for q in self.questions), 2)

    @property
    def max_total(self) -> float:
        """10 per question."""
        return MAX_SCORE * len(self.questions)

    @property
    def mean(self) -> float:
        """Mean score per question, 0-10: the research log's "x/10" figure."""
        return round(self.total / len(self.questions), 2) if self.questions else 0.0

    @property
    def noise(self) -> float:
        """Standard error of ``mean`` from the per-question spreads, in points (0 with one answer each).

        ``sqrt(sum(spread_q**2 / n_q)) / Q`` over the Q questions: how far the mean would
        move if the same model were asked again with other seeds.
        """
        if not self.questions:
            return 0.0
        variance = sum(q.spread**2 / q.n for q in self.questions)
        return round(math.sqrt(variance) / len(self.questions), 2)

    def by_id(self) -> dict[str, QuestionResult]:
        """Question id -> result."""
        return {q.id: q for q in self.questions}

    def to_dict(self) -> dict:
        """JSON-ready dict; ``from_dict`` reads it back."""
        return {
            "label": self.label,
            "version": self.version,
            "total": self.total,
            "max_total": self.max_total,
            "mean": self.mean,
            "noise": self.noise,
            "sampling": self.sampling,
            "questions": [
                {
                    "id": q.id,
                    "prompt": q.prompt,
                    "mean": q.mean,
                    "spread": q.spread,
                    "answers": [asdict(a) for a in q.answers],
                }
                for q in self.questions
            ],
            "probes": [p.to_dict() for p in self.probes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> RubricResult:
        """The inverse of ``to_dict`` (derived figures are recomputed).

        Also reads the one-answer-per-question format written before sampling existed
        (a ``scores`` list of QuestionScore dicts).
        """
        if "scores" in data and "questions" not in data:
            answers = [QuestionScore(**s) for s in data["scores"]]
            questions = [QuestionResult(a.id, a.prompt, [a]) for a in answers]
            return cls(data["label"], data["version"], questions, {"n": 1})
        questions = [
            QuestionResult(q["id"], q["prompt"], [QuestionScore(**a) for a in q["answers"]]) for q in data["questions"]
        ]
        probes = [ProbeResult.from_dict(p) for p in data.get("probes", [])]
        return cls(data["label"], data["version"], questions, data.get("sampling", {}), probes)



@dataclass
class ProbeOutcome:
    """One probe's answer and verdict: ``failures`` lists why it failed (empty when it passed)."""

    id: str
    kind: str
    prompt: str
    answer: str
    failures: list[str]
    finish_reason: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ProbeResult:
    """A model's answers to every probe.

    Attributes:
        label: the model's name in reports.
        system_prompt: whether the persona's system prompt was sent (False: the model's own
            default, which for molting's GGUF is the persona's prompt in its chat template).
        outcomes: one per probe, in file order.
        split: the probes' split, "dev" (``probes.yaml``) or "test" (``probes-test.yaml``, the headline).
    """

    label: str
    system_prompt: bool
    outcomes: list[ProbeOutcome]
    split: str = "dev"

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def pass_rate(self) -> float:
        """Share of probes passed, in [0, 1]."""
        return self.passed / len(self.outcomes) if self.outcomes else 0.0

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (passed, asked)}`` in first-seen order."""
        kinds: dict[str, tuple[int, int]] = {}
        for outcome in self.outcomes:
            passed, asked = kinds.get(outcome.kind, (0, 0))
            kinds[outcome.kind] = (passed + outcome.passed, asked + 1)
        return kinds

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "system_prompt": self.system_prompt,
            "split": self.split,
            "passed": self.passed,
            "asked": len(self.outcomes),
            "pass_rate": round(self.pass_rate, 4),
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ProbeResult:
        outcomes = [ProbeOutcome(**o) for o in data["outcomes"]]
        return cls(data["label"], data["system_prompt"], outcomes, data.get("split", "dev"))  # before issue 25: dev
