"""The scorer held to people: examples/claudio/labelled.jsonl, answers labelled 0-10 by hand."""

import json

import pytest

from molting.errors import DatasetError
from molting.eval import Judge, load_rubric
from molting.eval.calibration import calibrate, load_labelled, ranks, spearman
from molting.persona import Persona

LABELLED = "examples/claudio/labelled.jsonl"
MIN_RHO = 0.8
MAX_MEAN_GAP = 1.0


@pytest.fixture(scope="module")
def calibration():
    persona = Persona.load("examples/claudio")
    rubric = load_rubric(persona)
    return calibrate(Judge.for_persona(persona, rubric), rubric, load_labelled(LABELLED))


def test_the_labelled_set_holds_40_answers_24_of_them_real(calibration):
    items = calibration.items
    real = [i for i in items if i.source.startswith("molting run")]
    assert len(items) >= 40 and len(real) >= 24
    assert {i.model.split(" (")[0] for i in real} >= {
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct + LoRA, merged",
        "SmolLM2-135M-Instruct + LoRA, GGUF Q4_K_M",
    }
    assert all(i.reason.strip() for i in items)


def test_the_scorer_ranks_answers_as_people_do(calibration):
    assert calibration.rho >= MIN_RHO, [(i.id, i.label, s) for i, s in calibration.worst(8)]


def test_the_scorer_s_points_mean_what_people_s_do(calibration):
    assert abs(calibration.mean_gap) <= MAX_MEAN_GAP, [(i.id, i.label, s) for i, s in calibration.worst(8)]


def test_spearman_uses_average_ranks_for_ties():
    assert ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 0, 5, 9], [0, 1, 6, 6]) == pytest.approx(8 / 9)  # ranks [1.5, 1.5, 3, 4] and [1, 2, 3.5, 3.5]


def test_a_bad_label_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "labelled.jsonl"
    row = {"id": "a", "question_id": "joao", "answer": "Oi", "label": 4, "reason": "thin"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "b", "label": 11}) + "\n")
    with pytest.raises(DatasetError, match=r"labelled.jsonl:2: field 'label': label 11 not in 0-10"):
        load_labelled(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=r":2: field 'id': id 'a' is repeated"):
        load_labelled(path)
