"""The scorer against people, in sample and out (issue 25): prints JSON, writes nothing.

    python experiments/calibrate.py            # figures for docs/rubric.md

- ``tune``: the answers of ``examples/claudio/labelled.jsonl`` the weights and phrase lists
  were set against (in-sample);
- ``held-out``: answers labelled after the scorer's last change, committed before it scored
  them (out of sample);
- ``cv``: 5-fold cross-validation of tuning the weights on ``GRID`` over the tune part: each
  fold scored by the weights tuned on the other four (how far tuning on 51 answers carries).
"""

from __future__ import annotations

import json
from pathlib import Path

from molting.eval import Judge, load_rubric
from molting.eval.calibration import Calibration, calibrate, cross_validate, load_labelled, tune_weights
from molting.persona import Persona

ROOT = Path(__file__).resolve().parent.parent
PERSONA = ROOT / "examples" / "claudio"
# The two weights set against the labelled answers on 2026-12-06 (rubric.py), around today's values.
GRID = {"form_floor": [0.5, 0.75], "filler_penalty": [2.0, 4.0, 6.0]}


def figures(result: Calibration) -> dict:
    labels = [i.label for i in result.items]
    return {
        "n": len(result.items),
        "rho": round(result.rho, 3),
        "mean_gap": round(result.mean_gap, 2),
        "mean_label": round(sum(labels) / len(labels), 2),
        "mean_score": round(sum(result.scores) / len(result.scores), 2),
    }


def main() -> None:
    persona = Persona.load(PERSONA)
    rubric = load_rubric(persona)
    judge = Judge.for_persona(persona, rubric)
    items = load_labelled(PERSONA / "labelled.jsonl")
    parts = {split: [i for i in items if i.split == split] for split in ("tune", "held-out")}
    report = {split: figures(calibrate(judge, rubric, part)) for split, part in parts.items() if part}
    report["all"] = figures(calibrate(judge, rubric, items))
    by_model: dict[str, list] = {}
    for item in parts["held-out"]:
        by_model.setdefault(item.model, []).append(item)
    report["held-out by model"] = {m: figures(calibrate(judge, rubric, group)) for m, group in by_model.items()}
    folded = cross_validate(judge, rubric, parts["tune"], GRID)
    report["cv (5-fold over the weights' tuning, tune part)"] = figures(folded)
    tuned = tune_weights(judge, rubric, parts["tune"], GRID)
    report["weights tuned on the whole tune part"] = {k: getattr(tuned, k) for k in GRID}
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
