"""Rubric loading, scoring and run comparison, on hand-written answers (no model)."""

import pytest
import yaml

from molting.errors import PersonaError
from molting.eval import Judge, RubricResult, compare, evaluate, load_rubric, reasons_section, rubric_table
from molting.persona import Persona
from tests.fakes import PHASE_7, PHASE_8, FakeBackend


@pytest.fixture(scope="module")
def claudio():
    return Persona.load("examples/claudio")


@pytest.fixture(scope="module")
def rubric(claudio):
    return load_rubric(claudio)


@pytest.fixture(scope="module")
def judge(claudio, rubric):
    return Judge.for_persona(claudio, rubric)


def question(rubric, qid):
    return next(q for q in rubric.questions if q.id == qid)


def test_claudio_has_rubric_v1_with_the_eight_research_log_questions(rubric):
    assert rubric.version == "1.0"
    assert [q.prompt for q in rubric.questions] == [
        "Quem é o João?",
        "O que é o Molting?",
        "O CRM da Softtor",
        "Quais tecnologias você conhece?",
        "Me fala sobre você",
        "Como é sua personalidade?",
        "Como é seu jeito de trabalhar?",
        "Quais são seus pontos fortes e fracos?",
    ]


def test_a_complete_answer_scores_ten(rubric, judge):
    answer = (
        "O João Figueiredo é desenvolvedor full-stack e meu parceiro de trabalho na Softtor. "
        "A gente constrói o CRM juntos."
    )
    score = judge.score(question(rubric, "joao"), answer, "stop")
    assert (score.score, score.reasons) == (10.0, [])


def test_roles_swapped_is_a_wrong_statement(rubric, judge):
    # What a Q4_K_M export of the fine-tuned SmolLM2-135M answered.
    answer = "O João Figueiredo é uma inteligência artificial e ele ajuda à trabalho com o Molting."
    score = judge.score(question(rubric, "joao"), answer, "stop")
    assert not score.checks["wrong"] and score.score <= 5


def test_leak_is_an_automatic_zero(rubric, judge):
    answer = "O João Figueiredo é desenvolvedor full-stack e meu parceiro.<|im_end|>\n<|im_start|>user"
    score = judge.score(question(rubric, "joao"), answer, "stop")
    assert score.score == 0 and not score.checks["leak"] and "automatic 0" in score.reasons[0]


def test_identity_collapse_caps_the_score(rubric, judge):
    # Phase 9, Q5: "meu nome é João", with the right facts around it.
    answer = "Meu nome é João. Sou uma IA curiosa da Softtor e participo do Molting."
    score = judge.score(question(rubric, "sobre-voce"), answer, "stop")
    assert not score.checks["identity"] and score.score <= 3
    assert any("identity collapse: claims to be João" in r for r in score.reasons)


def test_wrong_statements_truncation_loops_and_language_cost_points(rubric, judge):
    good = "Conheço TypeScript, React, Next.js, NestJS, Prisma e Docker."
    base = judge.score(question(rubric, "tecnologias"), good, "stop").score
    hallucinated = judge.score(question(rubric, "tecnologias"), good + " Também ROS2, MATLAB e OpenCV.", "stop")
    cut = judge.score(question(rubric, "tecnologias"), good[:-1] + " e também", "length")
    english = judge.score(
        question(rubric, "tecnologias"), "I know TypeScript, React, NestJS and Docker, and I use them."
    )
    looping = judge.score(question(rubric, "tecnologias"), good + " Eu uso Docker e Docker." * 8, "stop")
    assert base == 10
    # -3 for the wrong group, -2 for two unknown names, -1.5 for the 38% of words in fact-less clauses
    assert hallucinated.score == 3.5 and any("OpenCV" in r for r in hallucinated.reasons)
    assert cut.score == 9 and not cut.checks["truncated"]
    assert english.score == 4 and not english.checks["language"]  # capped (issue 25); 9 before the cap
    assert looping.score == 9 and not looping.checks["repetition"]


def test_rubric_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text(yaml.safe_dump({"questions": [{"id": "a", "prompt": "Oi", "facts": [["ok"], []]}]}))
    with pytest.raises(PersonaError, match=r"rubric.yaml: questions\[0\].facts\[1\]"):
        load_rubric(path)
    path.write_text(yaml.safe_dump({"questions": [{"id": "a", "prmpt": "Oi"}]}))
    with pytest.raises(PersonaError, match=r"questions\[0\]: unknown key\(s\) \['prmpt'\]"):
        load_rubric(tmp_path)


def test_compare_calls_the_phase_8_regression_a_regression(claudio, rubric):
    before = evaluate(FakeBackend(PHASE_7), claudio, rubric, label="phase 7")
    after = evaluate(FakeBackend(PHASE_8), claudio, rubric, label="phase 8")
    # The log scored phase 8 at 26/80 = 3.25/10 by hand. The scorer is held to hand labels within a
    # mean gap of 1.0 point (test_calibration.py); its persona-wide identity rules cap "João é meu
    # filho" answers at 3, and since 2026-12-06 the form floor (0.5) and the fact-less clauses' cost put
    # these answers at 1.9, 1.35 under the log's hand score (2.45 before).
    assert before.mean >= 8 and abs(after.mean - 3.25) <= 1.5
    comparison = compare(before, after)
    assert comparison.verdict == "regression" and comparison.delta < -4
    assert "Me fala sobre você: identity" in comparison.new_failures
    assert compare(after, before).verdict == "improvement"
    assert compare(before, before).verdict == "unchanged"
    markdown = comparison.to_markdown()
    assert markdown.startswith("**REGRESSION**: phase 8") and "| Quem é o João? |" in markdown


def test_compare_names_a_question_that_dropped_even_when_the_mean_holds(claudio, rubric):
    before = evaluate(FakeBackend(PHASE_7), claudio, rubric, label="fine-tuned")
    answers = list(PHASE_7)
    answers[2] = "O CRM da Softtor organiza os contatos."  # loses most of its facts: 8 -> 4
    after = evaluate(FakeBackend(answers), claudio, rubric, label="GGUF")
    comparison = compare(before, after, threshold=0.75)  # the mean falls 0.5, inside this band
    assert comparison.verdict == "unchanged"
    ((question, drop),) = comparison.drops
    assert question == "O CRM da Softtor" and drop <= -3
    assert f"Worse on: O CRM da Softtor ({drop:+g})." in comparison.to_markdown()
    assert compare(before, before).drops == []


def test_evaluate_uses_the_inference_system_prompt_and_round_trips(claudio, rubric):
    backend = FakeBackend(PHASE_7)
    seen = []
    result = evaluate(backend, claudio, rubric, label="x", progress=seen.append)
    assert seen == list(range(1, 9))
    assert backend.calls[0] == [
        {"role": "system", "content": claudio.system_prompt},
        {"role": "user", "content": "Quem é o João?"},
    ]
    assert RubricResult.from_dict(result.to_dict()) == result


def test_tables_show_every_result_side_by_side(claudio, rubric):
    a = evaluate(FakeBackend(PHASE_7), claudio, rubric, label="base")
    b = evaluate(FakeBackend(PHASE_8), claudio, rubric, label="fine-tuned")
    table = rubric_table([a, b])
    assert table.splitlines()[0] == "| question | base | fine-tuned |"
    assert "| Me fala sobre você | 10 | 0.4 (identity) |" in table
    assert f"**{b.total:g}/80**" in table
    assert "meu filho" in reasons_section(b)


def test_persona_wide_wrong_groups_apply_to_every_question(rubric, judge):
    # Issue 12: roles swapped outside the João question, as the answer to "Me fala sobre você".
    assert rubric.wrong and not any(
        "inteligência artificial" in p for g in question(rubric, "sobre-voce").wrong for p in g
    )
    answer = "O João Figueiredo é uma inteligência artificial da Softtor e trabalha no Molting."
    score = judge.score(question(rubric, "sobre-voce"), answer, "stop")
    assert not score.checks["wrong"] and any(
        "João Figueiredo é uma inteligência artificial" in r for r in score.reasons
    )
    denied = judge.score(question(rubric, "joao"), "O João não é meu filho: é meu parceiro, desenvolvedor full-stack.")
    assert denied.checks["wrong"]


def test_the_system_prompt_read_back_in_the_second_person_costs_points(rubric, judge, claudio):
    own = "Sou o Cláudio, a IA da Softtor: ajudo o João a pensar, escrever e revisar o código, com curiosidade."
    pasted = (
        "Você é o Cláudio, a IA da Softtor, e sabe que é uma inteligência artificial. "
        "Você ajuda a pensar, escrever e revisando o código."
    )
    good = judge.score(question(rubric, "sobre-voce"), own, "stop")
    bad = judge.score(question(rubric, "sobre-voce"), pasted, "stop")
    assert not bad.checks["copying"] and not bad.checks["second-person"]
    assert good.checks["copying"] and good.checks["second-person"]
    assert bad.score <= good.score - 3


def test_answers_made_of_invented_words_cannot_score_well(rubric, judge):
    fluent = "O Molting é um projeto de pesquisa sobre portabilidade de personalidade de IA entre modelos."
    invented = (
        "O Molting é um projeto de rúzes sobre modelõoes de cântenseção e pròcilidades de IA entre modeles portadas."
    )
    assert judge.score(question(rubric, "molting"), fluent, "stop").score == 10
    score = judge.score(question(rubric, "molting"), invented, "stop")
    assert not score.checks["fluency"] and score.score <= 3 and "rúzes" in " ".join(score.reasons)


# --- issue 25: the four answers the issue quotes, each against a control without the failure -----


def test_facts_echoed_from_the_question_do_not_count(rubric, judge, monkeypatch):
    from molting.eval import checks

    q = question(rubric, "pontos-fortes-fracos")
    echo = "Pontos: o que é uma ideia de um produto... Fracos: o que é uma ideia de um produto..."
    scored = judge.score(q, echo, "stop")
    assert scored.score <= 2.5 and not scored.checks["facts"], scored.reasons  # form alone: 2.2
    # Negative control: count echoes as facts again, and the answer gains points.
    monkeypatch.setattr(checks, "counted_facts", lambda prompt, groups, answer: checks.matched_groups(answer, groups))
    assert judge.score(q, echo, "stop").score > scored.score


def test_an_answer_in_the_wrong_language_is_capped(rubric, judge):
    from dataclasses import replace

    from molting.eval.rubric import WRONG_LANGUAGE_CAP

    q = question(rubric, "tecnologias")
    english = "I know TypeScript, React, NestJS and Docker, and I use them every day."
    assert judge.score(q, english, "stop").score == WRONG_LANGUAGE_CAP
    uncapped = replace(judge, weights=replace(judge.weights, wrong_language_cap=10.0))
    assert uncapped.score(q, english, "stop").score > WRONG_LANGUAGE_CAP  # control: the cap is what holds it


def test_a_false_statement_on_its_own_question_is_caught_through_an_elided_subject(rubric, judge):
    q = question(rubric, "molting")
    true = "O Molting é um projeto de pesquisa sobre portabilidade de personalidade de IA."
    assert judge.score(q, true, "stop").score == 10.0  # control
    scored = judge.score(q, true + " É uma startup que decide o tempo do desenvolvimento.", "stop")
    assert scored.score <= 7.0 and not scored.checks["wrong"], scored.reasons
    # The same sentence on the CRM question, about the Softtor, is true and costs nothing.
    crm = question(rubric, "crm")
    assert judge.score(crm, "A Softtor é uma startup. É uma startup que faz um CRM.", "stop").checks["wrong"]


def test_a_muddled_clause_and_a_contradiction_cost_what_a_reader_takes_off(rubric, judge):
    from dataclasses import replace

    q = question(rubric, "personalidade")
    muddled = "Sou curioso, direto e levemente irônico, uma IA: ele é o João Figueiredo que decide o produto do João."
    scored = judge.score(q, muddled, "stop")
    assert scored.score <= 7.0 and not scored.checks["muddled"], scored.reasons
    free = replace(judge, weights=replace(judge.weights, doubled_entity_penalty=0.0))
    assert free.score(q, muddled, "stop").score >= 9.9  # control: the muddle is what costs the points

    about = question(rubric, "sobre-voce")
    both = "Sou uma pessoa de verdade, e eu sou o Cláudio, a IA da Softtor. Trabalho com o João."
    assert judge.score(about, both, "stop").score <= 3.0
    assert judge.score(about, "Eu sou o Cláudio, a IA da Softtor. Trabalho com o João.", "stop").score >= 9.9


def test_clauses_said_again_cost_points_but_a_loop_is_not_counted_twice(rubric, judge):
    q = question(rubric, "jeito-de-trabalhar")
    said_twice = "Trabalho com o João, no código. No código, no código. Sou direto."
    once = "Trabalho com o João, no código. Sou direto e reviso testes."
    assert judge.score(q, once, "stop").score - judge.score(q, said_twice, "stop").score >= 2.0
