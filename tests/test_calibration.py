"""The scorer held to people: examples/claudio/labelled.jsonl, answers labelled 0-10 by hand.

The thresholds hold on the held-out part (issue 25): answers labelled after the scorer's last
change and committed before it scored them. The tune part, which the weights and phrase lists
were set against, is reported beside it and held to the same figures as a regression guard.
"""

import json
import re

import pytest

from molting.errors import DatasetError
from molting.eval import Judge, load_rubric
from molting.eval.calibration import calibrate, cross_validate, load_labelled, ranks, spearman, tune_weights
from molting.persona import Persona

LABELLED = "examples/claudio/labelled.jsonl"
MIN_RHO = 0.8
MAX_MEAN_GAP = 1.0
# When the rubric's checks or weights last changed (UTC): held-out answers must be labelled after it.
# Out of sample since then (24 fresh GGUF answers, labelled 04:22): rho 0.836, gap +0.92; the scorer
# before the change gave the same answers rho 0.803, gap +1.87.
SCORER_LAST_CHANGED = "2026-12-06 04:13"
# The tune part is held to a guard below the thresholds: it holds the 48 answers of the 2026-12-06 00:23
# demo that the scorer failed out of sample (rho 0.63, gap +1.96), and on all 99 the tuned scorer ranks
# them at rho 0.78 (gap +0.46), 2026-12-06.
MIN_RHO_IN_SAMPLE = 0.75


@pytest.fixture(scope="module")
def claudio():
    persona = Persona.load("examples/claudio")
    rubric = load_rubric(persona)
    return Judge.for_persona(persona, rubric), rubric


@pytest.fixture(scope="module")
def calibration(claudio):
    """The tune part: in-sample figures."""
    judge, rubric = claudio
    return calibrate(judge, rubric, [i for i in load_labelled(LABELLED) if i.split == "tune"])


@pytest.fixture(scope="module")
def held_out(claudio):
    judge, rubric = claudio
    items = [i for i in load_labelled(LABELLED) if i.split == "held-out"]
    if not items:  # issue 25: the fresh run's answers are not labelled yet; say so instead of passing
        pytest.skip("labelled.jsonl has no held-out answers yet (issue 25, open): the thresholds wait for them")
    return calibrate(judge, rubric, items)


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


def test_the_held_out_part_holds_24_fresh_answers_of_a_new_run(held_out):
    items = held_out.items
    assert len(items) >= 24 and all(i.reason.strip() for i in items)
    # answers labelled after the scorer last changed: the labelling time stands in labelled_by
    times = [re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", i.labelled_by) for i in items]
    assert all(t and t.group() > SCORER_LAST_CHANGED for t in times), [i.labelled_by for i in items]
    # answers of personas molting trained: the base's answers score near 0 on both sides and flatter rho
    assert all("fine-tuned" in i.model for i in items), [i.model for i in items]


def test_the_scorer_ranks_unseen_answers_as_people_do(held_out):
    assert held_out.rho >= MIN_RHO, [(i.id, i.label, s) for i, s in held_out.worst(8)]


def test_the_scorer_s_points_mean_what_people_s_do_on_unseen_answers(held_out):
    assert abs(held_out.mean_gap) <= MAX_MEAN_GAP, [(i.id, i.label, s) for i, s in held_out.worst(8)]


def test_in_sample_the_scorer_still_agrees(calibration):
    assert calibration.rho >= MIN_RHO_IN_SAMPLE and abs(calibration.mean_gap) <= MAX_MEAN_GAP


def test_tuning_finds_the_weights_the_labels_were_made_with(claudio):
    from dataclasses import replace

    from molting.eval.calibration import Labelled

    judge, rubric = claudio
    answers = [
        ("tecnologias", "I know TypeScript, React, NestJS and Docker, and I use them every day."),
        ("tecnologias", "Conheço TypeScript, React, Next.js, NestJS, Prisma e Docker."),
        ("tecnologias", "Conheço TypeScript e um pouco de React."),
        ("joao", "João is a full-stack developer and my partner at Softtor."),
        ("joao", "O João Figueiredo é desenvolvedor full-stack e trabalha comigo."),
        ("joao", "O João é legal."),
    ]
    questions = {q.id: q for q in rubric.questions}
    grid = {"wrong_language_cap": [2.0, 10.0]}
    for cap in (2.0, 10.0):  # labels a person would give with this cap in mind; the other cap is the control
        labeller = replace(judge, weights=replace(judge.weights, wrong_language_cap=cap))
        items = [
            Labelled(f"a{k}", qid, text, labeller.score(questions[qid], text, "stop").score, "synthetic", "stop")
            for k, (qid, text) in enumerate(answers)
        ]
        assert tune_weights(judge, rubric, items, grid).wrong_language_cap == cap
    with pytest.raises(ValueError, match="grid keys"):
        tune_weights(judge, rubric, items, {"nonsense": [1.0]})
    folded = cross_validate(judge, rubric, items, grid, k=3)
    assert len(folded.scores) == len(items) and -1 <= folded.rho <= 1


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
