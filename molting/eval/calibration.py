"""Holding the scorer to people: a hand-labelled answer set and the agreement figures.

A labelled set is JSONL, one answer per line::

    {"id": "demo-gguf-sobre-voce", "question_id": "sobre-voce", "answer": "...",
     "finish_reason": "stop", "label": 1, "reason": "roles swapped", "model": "...", "source": "..."}

``label`` is a person's 0-10 score, given by reading the answer against its question in
the spirit of the research log's Rubric v1.0, before and without looking at molting's
score. ``calibrate`` scores every answer with a ``Judge`` and reports the Spearman rank
correlation with the labels and the mean gap (scorer minus label): the first says whether
the scorer orders answers as a person does, the second whether its points mean the same.

Each answer has a ``split`` (issue 25): "tune", the answers the scorer's weights and phrase
lists were set against (in-sample figures), or "held-out", answers labelled after the scorer
was last changed and committed before it scored them (the figures that measure it).
``cross_validate`` estimates the held-out figures of the weights' tuning itself: k-fold,
each fold scored with weights tuned (``tune_weights``) on the other folds.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from molting.errors import DatasetError
from molting.eval.rubric import Judge, Question, Rubric, Weights

REQUIRED = ("id", "question_id", "answer", "label", "reason")
SPLITS = ("tune", "held-out")


@dataclass(frozen=True)
class Labelled:
    """One answer with a person's score.

    Attributes:
        id: unique within the file.
        question_id: the rubric question it answers.
        answer: the text as the model generated it.
        label: the person's score, 0-10.
        reason: the person's one-line reason.
        finish_reason: the backend's "stop" or "length", if known.
        model: which model answered.
        source: where the answer comes from (a run's file, the research log, by hand).
        split: "tune" (the scorer was set against it) or "held-out" (labelled and committed
            before the scorer's last change saw it); see the module docstring.
        labelled_by: who labelled it, how, and when ("YYYY-MM-DD HH:MM UTC" for held-out answers).
    """

    id: str
    question_id: str
    answer: str
    label: float
    reason: str
    finish_reason: str | None = None
    model: str = ""
    source: str = ""
    split: str = "tune"
    labelled_by: str = ""


def load_labelled(path: str | Path) -> list[Labelled]:
    """Read a labelled set.

    Raises:
        DatasetError: naming the file, line and field: invalid JSON, a missing field, a
            label outside 0-10, a repeated id, an unknown split.
    """
    path, items, seen = Path(path), [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(path, number, f"invalid JSON: {exc.msg}") from None
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise DatasetError(path, number, f"missing {missing}", field=missing[0])
        if not isinstance(record["label"], int | float) or not 0 <= record["label"] <= 10:
            raise DatasetError(path, number, f"label {record['label']!r} not in 0-10", field="label")
        if record.get("split", "tune") not in SPLITS:
            raise DatasetError(path, number, f"split {record['split']!r} not in {SPLITS}", field="split")
        if record["id"] in seen:
            raise DatasetError(path, number, f"id {record['id']!r} is repeated", field="id")
        seen.add(record["id"])
        fields = Labelled.__dataclass_fields__
        items.append(Labelled(**{k: v for k, v in record.items() if k in fields}))
    return items


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``, ties sharing their average rank (as Spearman's rho requires)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the tie-averaged ranks.

    Raises:
        ValueError: fewer than two pairs, different lengths, or a constant sequence.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} scores against {len(y)} labels")
    return statistics.correlation(ranks(x), ranks(y))


@dataclass
class Calibration:
    """The scorer against the labels.

    Attributes:
        items: the labelled answers, in file order.
        scores: molting's score of each, 0-10.
        rho: Spearman's rank correlation of scores and labels.
        mean_gap: mean of (score - label), in points; positive: the scorer is kinder.
    """

    items: list[Labelled]
    scores: list[float]
    rho: float
    mean_gap: float

    def worst(self, k: int = 10) -> list[tuple[Labelled, float]]:
        """The ``k`` answers the scorer disagrees with most, largest |score - label| first."""
        pairs = list(zip(self.items, self.scores, strict=True))
        return sorted(pairs, key=lambda p: abs(p[1] - p[0].label), reverse=True)[:k]


def score_items(judge: Judge, rubric: Rubric, items: Sequence[Labelled]) -> list[float]:
    """``judge``'s score of each labelled answer, 0-10, in order.

    Raises:
        KeyError: an item's ``question_id`` is not in ``rubric``.
    """
    questions: dict[str, Question] = {q.id: q for q in rubric.questions}
    return [judge.score(questions[i.question_id], i.answer, i.finish_reason).score for i in items]


def calibrate(judge: Judge, rubric: Rubric, items: Sequence[Labelled]) -> Calibration:
    """Score every labelled answer with ``judge`` and compare with the labels.

    Raises:
        KeyError: an item's ``question_id`` is not in ``rubric``.
    """
    scores = score_items(judge, rubric, items)
    labels = [i.label for i in items]
    gap = statistics.fmean(s - label for s, label in zip(scores, labels, strict=True))
    return Calibration(list(items), scores, spearman(scores, labels), gap)


def tune_weights(judge: Judge, rubric: Rubric, items: Sequence[Labelled], grid: dict[str, Sequence[float]]) -> Weights:
    """The ``Weights`` on ``grid`` (field -> values; other fields as ``judge.weights``) whose
    scores of ``items`` rank best with the labels: highest Spearman rho, then smallest |mean gap|.

    Raises:
        ValueError: a grid key that is not a ``Weights`` field.
    """
    if unknown := sorted(set(grid) - set(Weights.__dataclass_fields__)):
        raise ValueError(f"grid keys {unknown} not in {sorted(Weights.__dataclass_fields__)}")
    best, best_key = judge.weights, None
    for values in itertools.product(*grid.values()):
        weights = replace(judge.weights, **dict(zip(grid, values, strict=True)))
        scores = score_items(replace(judge, weights=weights), rubric, items)
        labels = [i.label for i in items]
        try:
            rho = spearman(scores, labels)
        except (ValueError, ZeroDivisionError, statistics.StatisticsError):  # constant scores: no order at all
            rho = -1.0
        key = (round(rho, 6), -abs(statistics.fmean(s - y for s, y in zip(scores, labels, strict=True))))
        if best_key is None or key > best_key:
            best, best_key = weights, key
    return best


def cross_validate(
    judge: Judge, rubric: Rubric, items: Sequence[Labelled], grid: dict[str, Sequence[float]], k: int = 5
) -> Calibration:
    """k-fold cross-validation of ``tune_weights``: each fold scored by weights tuned on the others.

    Folds are every k-th item (file order interleaves models and questions). The result pools
    the out-of-fold scores: its rho and mean gap are what tuning on such a set gives on answers
    it did not see.
    """
    scores: list[float] = [0.0] * len(items)
    for fold in range(k):
        train = [item for i, item in enumerate(items) if i % k != fold]
        tuned = replace(judge, weights=tune_weights(judge, rubric, train, grid))
        held = [i for i in range(len(items)) if i % k == fold]
        fold_scores = score_items(tuned, rubric, [items[i] for i in held])
        for i, score in zip(held, fold_scores, strict=True):
            scores[i] = score
    labels = [i.label for i in items]
    gap = statistics.fmean(s - label for s, label in zip(scores, labels, strict=True))
    return Calibration(list(items), scores, spearman(scores, labels), gap)
