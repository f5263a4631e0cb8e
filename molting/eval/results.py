"""What an evaluation returns: the rubric's scored answers, the probes' verdicts, the drift.

The rubric (``molting.eval.rubric``), the held-out probes (``molting.eval.probes``) and the
held-out conversations (``molting.eval.conversations``) produce these; a ``RubricResult``
carries the same model's ``ProbeResult`` list and ``DriftResult``, so the modules share them
here rather than importing each other. Every type round-trips through
``to_dict``/``from_dict`` (the run registry and ``eval/*.json`` hold them as JSON).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

# Points of a perfect answer to one rubric question.
MAX_SCORE = 10.0
# A change is called only beyond this many standard errors of the difference (from the answers' spread);
# ``molting.eval.report`` for the rubric, ``molting.eval.conversations`` for drift.
NOISE_Z = 2.0
# Drift's headline figure (``molting.eval.conversations``): the share of answers held from this turn (1-based) on.
LATE_TURN = 8
# The failures of a conversation's answer that lose the persona's identity (``ConversationRun.identity_lost``).
IDENTITY_FAILURES = ("identity", "wrong")


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
        drift: the same model's held-out conversations (``DriftResult``); None when not run.
    """

    label: str
    version: str
    questions: list[QuestionResult]
    sampling: dict = field(default_factory=dict)
    probes: list[ProbeResult] = field(default_factory=list)
    drift: DriftResult | None = None

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
            **({"drift": self.drift.to_dict()} if self.drift is not None else {}),
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
        drift = DriftResult.from_dict(data["drift"]) if data.get("drift") else None
        return cls(data["label"], data["version"], questions, data.get("sampling", {}), probes, drift)



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


@dataclass
class TurnOutcome:
    """One answer of a conversation and why it failed (empty: it held).

    Attributes:
        turn: the turn's index, 1-based.
        dropped: earlier messages dropped from the prompt to fit the context (``fit_to_context``).
    """

    turn: int
    user: str
    answer: str
    failures: list[str]
    finish_reason: str | None = None
    dropped: int = 0

    @property
    def held(self) -> bool:
        return not self.failures


@dataclass
class ConversationRun:
    """One conversation answered once: an outcome per turn."""

    id: str
    outcomes: list[TurnOutcome]

    def identity_lost(self, kinds: dict[int, str | None] | None = None) -> int | None:
        """The first turn (1-based) whose answer lost the persona's identity; None if it held throughout."""
        for outcome in self.outcomes:
            identity_turn = (kinds or {}).get(outcome.turn) == "identity"
            for failure in outcome.failures:
                name = failure.split(":", 1)[0]
                if name in IDENTITY_FAILURES or (identity_turn and name in ("expect", "forbid")):
                    return outcome.turn
        return None


@dataclass
class DriftResult:
    """A model's answers to every held-out conversation, over several decodings.

    Attributes:
        label: the model's name in reports.
        runs: per decoding (the greedy one first, then the samples), one ConversationRun per script.
        decodings: per run, its ``temperature`` and ``seed``.
        identity_turns: per conversation id, the turns (1-based) of kind "identity".
        seconds: wall time of generating and judging every run, in seconds.
    """

    label: str
    runs: list[list[ConversationRun]]
    decodings: list[dict] = field(default_factory=list)
    identity_turns: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def turns(self) -> int:
        """The longest conversation's number of turns."""
        return max((len(c.outcomes) for run in self.runs for c in run), default=0)

    def held(self, run: list[ConversationRun], first: int = 1, last: int | None = None) -> tuple[int, int]:
        """``(held, asked)`` over the answers of ``run`` at turns ``first``..``last`` (1-based, inclusive)."""
        answers = [o for c in run for o in c.outcomes if o.turn >= first and (last is None or o.turn <= last)]
        return sum(o.held for o in answers), len(answers)

    def curve(self) -> list[tuple[int, float, float, float]]:
        """Per turn: ``(turn, greedy share, mean share over runs, spread)``; shares in [0, 1], spread the runs' s.d."""
        rows = []
        for turn in range(1, self.turns + 1):
            shares = [h / n for h, n in (self.held(run, turn, turn) for run in self.runs) if n]
            spread = statistics.stdev(shares) if len(shares) > 1 else 0.0
            rows.append((turn, shares[0], statistics.fmean(shares), spread))
        return rows

    def share(self, first: int = LATE_TURN) -> tuple[float, float]:
        """The share of answers held at turns >= ``first``, mean over runs, and its standard error.

        The standard error is the larger of the runs' (s.d. / sqrt(runs)) and the binomial one
        over all the answers counted (sqrt(p (1 - p) / N)): with one run, or runs that agree,
        the number of answers still bounds how well the share is known.
        """
        counts = [self.held(run, first) for run in self.runs]
        shares = [h / n for h, n in counts if n]
        if not shares:
            return 0.0, 0.0
        mean = statistics.fmean(shares)
        runs_se = statistics.stdev(shares) / math.sqrt(len(shares)) if len(shares) > 1 else 0.0
        total = sum(n for _, n in counts)
        return mean, max(runs_se, math.sqrt(mean * (1 - mean) / total))

    def identity_lost(self, run: int = 0) -> dict[str, int | None]:
        """Per conversation id, the turn identity was first lost in run ``run`` (0: greedy)."""
        kinds = self.identity_turns
        return {c.id: c.identity_lost(dict.fromkeys(kinds.get(c.id, []), "identity")) for c in self.runs[run]}

    def to_dict(self) -> dict:
        """JSON-ready; ``from_dict`` reads it back."""
        late, noise = self.share()
        return {
            "label": self.label,
            "late_turn": LATE_TURN,
            "late_share": round(late, 4),
            "late_noise": round(noise, 4),
            "decodings": self.decodings,
            "identity_turns": self.identity_turns,
            "seconds": round(self.seconds, 1),
            "runs": [[{"id": c.id, "outcomes": [asdict(o) for o in c.outcomes]} for c in run] for run in self.runs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> DriftResult:
        runs = [
            [ConversationRun(c["id"], [TurnOutcome(**o) for o in c["outcomes"]]) for c in run] for run in data["runs"]
        ]
        return cls(
            data["label"], runs, data.get("decodings", []), data.get("identity_turns", {}), data.get("seconds", 0.0)
        )
