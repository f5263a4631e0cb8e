"""The rubric's checks on hand-written answers, including the research log's failures."""

import pytest

from molting.eval import checks


@pytest.mark.parametrize(
    ("answer", "leaked"),
    [
        ("Sou o Cláudio.<|im_end|>", ["<|im_end|>"]),
        ("Oi!\nassistant\nOi de novo", ["role header 'assistant'"]),
        ("[INST] oi [/INST] olá </s>", ["[INST]", "[/INST]", "</s>"]),
        ("<|start_header_id|>user", ["<|start_header_id|>"]),
        ("Eu sou o assistente da Softtor, e isso é tudo.", []),
    ],
)
def test_leaked_tokens(answer, leaked):
    assert checks.leaked_tokens(answer) == leaked


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        ("Meu nome é João e eu programo.", ["João"]),
        ("Olá! Eu sou o João Figueiredo.", ["João", "João Figueiredo"]),
        ("EU SOU O JOAO", ["João"]),
        ("I am a helpful AI assistant named SmolLM.", ["AI assistant"]),
        ("Sou o ChatGPT, um modelo da OpenAI.", ["ChatGPT"]),
        # Mentioning João is not claiming to be him.
        ("Sou o Cláudio. Trabalho com o João, que é meu parceiro.", []),
        ("Sou parceiro do João na Softtor.", []),
        ("O João e eu construímos o CRM.", []),
        ("Sou o Cláudio, não o Joãozinho.", []),
    ],
)
def test_identity_claims(answer, claims):
    assert checks.identity_claims(answer, ["João", "João Figueiredo"]) == claims


def test_phrases_match_whole_words_ignoring_case_and_accents():
    assert checks.has_phrase("Eu sou a IA da SOFTTOR.", "softtor")
    assert checks.has_phrase("Conheço next.js e react", "Next.js")
    assert checks.has_phrase("uma inteligencia artificial", "inteligência artificial")
    assert not checks.has_phrase("Tenho uma ideia", "IA")
    assert checks.matched_groups(
        "sou direto e irônico", [["curioso"], ["direto", "franco"], ["ironia", "irônico"]]
    ) == [
        None,
        "direto",
        "irônico",
    ]


@pytest.mark.parametrize(
    ("answer", "language"),
    [
        ("Eu sou o Cláudio e trabalho com o João na Softtor.", "pt"),
        ("I am Cláudio and I work with João at Softtor.", "en"),
        ("Soy Cláudio y trabajo con João en la empresa.", "es"),
        ("TypeScript!", None),
    ],
)
def test_detect_language(answer, language):
    assert checks.detect_language(answer) == language


def test_truncation_needs_the_length_limit_and_an_open_sentence():
    assert checks.is_truncated("O CRM organiza os clientes e", "length")
    assert not checks.is_truncated("O CRM organiza os clientes.", "length")
    assert not checks.is_truncated("O CRM organiza os clientes e", "stop")


def test_repetition_ratio_catches_a_greedy_loop():
    loop = "Eu sou o Cláudio e eu sou o Cláudio e " * 6
    assert checks.repetition_ratio(loop) > 0.7
    assert checks.repetition_ratio("Sou curioso, direto e levemente irônico, e gosto de TypeScript.") == 0.0
    assert checks.repetition_ratio("Oi") == 0.0


def test_unknown_entities_ignore_sentence_starts_and_known_names():
    known = checks.vocabulary(["Conheço TypeScript, React e Docker.", "Node.js"])
    answer = "Eu conheço TypeScript e Node.js. Também uso ROS2, MATLAB e o framework Hector. Olá!"
    assert checks.unknown_entities(answer, known) == ["ROS2", "MATLAB", "Hector"]


@pytest.mark.parametrize(
    ("answer", "claims"),
    [
        ("Você é o João, desenvolvedor.", ["João"]),  # the second person of a recited prompt (phase 8, Q5)
        ("O Cláudio é o João.", ["João"]),  # third person
        ("Eu não sou o João; sou o Cláudio.", []),  # a denial is not a claim
        ("Você e o João construíram o CRM.", []),  # "e" (and) is not "é" (is)
    ],
)
def test_identity_claims_in_any_grammatical_person(answer, claims):
    assert checks.identity_claims(answer, ["João"], self_names=["Cláudio"]) == claims


def test_second_person_self_reference_is_the_prompt_read_back():
    names = ["Cláudio", "Claudio"]
    assert checks.second_person_self_references("Você é o Cláudio, a IA da Softtor.", names) == ["voce eh o claudio"]
    assert checks.second_person_self_references("Oi! Você é uma IA e trabalha com o João.", names) == ["voce eh uma ia"]
    assert checks.second_person_self_references("Sou o Cláudio. Você é o João?", names) == []
    assert checks.second_person_self_references("Eu sou o Cláudio, uma IA.", names) == []


def test_invented_words_are_counted_and_persona_words_are_known():
    # Words the make demo run's models invented (issue 12).
    answer = "A Softtor tem rúzes e modelõoes de cântenseção com pròcilidades."
    share, invented = checks.invented_share(answer, "pt", checks.vocabulary(["Softtor"]))
    assert invented == ["rúzes", "modelõoes", "cântenseção", "pròcilidades"] and share == 0.4
    # Persona vocabulary, Brazilian spellings of European-Portuguese words, English loanwords, names.
    fluent = "Sou curioso e levemente irônico; faço deploy no Docker e reviso o código tipado do ROS2."
    assert checks.invented_words(fluent, "pt", checks.vocabulary(["tipado", "Docker"])) == []
    assert checks.invented_words(fluent, "pt", set()) == ["tipado"]
    assert checks.invented_share("", "pt", set()) == (0.0, [])


def test_copied_share_counts_prompt_ngrams_not_in_the_persona_s_own_answers():
    prompt = "O João é seu parceiro: ele define os rumos do produto e você ajuda a pensar, escrever e revisar o código."
    pasted = "Você ajuda a pensar, escrever e revisar o código."
    assert checks.copied_share(pasted, prompt) == 1.0
    assert checks.copied_share("Eu reviso o código e penso junto com o João.", prompt) == 0.0
    # Phrasing the persona itself uses in its dataset is not copying.
    assert checks.copied_share(pasted, prompt, exempt=["você ajuda a pensar, escrever e revisar"]) == 2 / 6
    assert checks.copied_share("Oi", prompt) == 0.0


# --- issue 25: each check fires on the failure a reader saw, and stays silent on its control ------


def test_a_fact_matched_only_by_the_question_s_own_words_is_an_echo():
    question, groups = "Quais são seus pontos fortes e fracos?", [["fortes", "forte"], ["fracos"], ["curioso"]]
    echo = "Pontos: o que é uma ideia de um produto... Fracos: o que é uma ideia de um produto..."
    assert checks.matched_groups(echo, groups) == [None, "fracos", None]  # what the rubric used to count
    assert checks.counted_facts(question, groups, echo) == [None, None, None]
    # Control: the same words framing real content count.
    good = "Pontos fortes: sou curioso. Fracos: às vezes sou direto demais."
    assert checks.counted_facts(question, groups, good) == ["fortes", "fracos", "curioso"]
    assert checks.echoed_groups(question, groups, checks.matched_groups(good, groups)) == [True, True, False]


def test_wrong_language_names_the_language_and_spares_the_right_one():
    assert checks.wrong_language("Strong points are the ones that stand out in a work of art.", "pt") == "en"
    assert checks.wrong_language("Meus pontos fortes são a curiosidade e a franqueza.", "pt") is None
    assert checks.wrong_language("Oi!", "pt") is None  # too short to tell


def test_a_sentence_opening_on_a_bare_copula_states_the_previous_subject():
    answer = "O Molting é um projeto de pesquisa sobre portabilidade. É uma startup que decide o tempo."
    assert not any(checks.stated_groups(answer, [["Molting é uma startup"]]))  # what the rubric used to see
    assert checks.elided_statements(answer, ["Molting é uma startup"]) == ["Molting é uma startup"]
    # Controls: another subject, a denial, a sentence with a subject of its own.
    assert checks.elided_statements("O Molting é um projeto. A Softtor é uma startup.", ["Molting é uma startup"]) == []
    assert checks.elided_statements("O Molting é um projeto. Não é uma startup.", ["Molting é uma startup"]) == []
    assert checks.elided_statements("Molting is research. It is a startup.", ["Molting is a startup"]) == [
        "Molting is a startup"
    ]


def test_an_elided_subject_is_found_without_the_phrases_article():
    # A fresh demo answer (2026-12-06) a reader gave 3 and the rubric 10: João made the AI.
    answer = "João Figueiredo é o desenvolvedor full-stack da Softtor. É a IA do CRM, que eu trabalho com ele."
    assert checks.elided_statements(answer, ["o João Figueiredo é a IA"]) == ["o João Figueiredo é a IA"]
    # Control: the AI is the speaker, said with a subject of its own.
    control = "João Figueiredo é o desenvolvedor full-stack da Softtor. Eu sou a IA do CRM e trabalho com ele."
    assert checks.elided_statements(control, ["o João Figueiredo é a IA"]) == []


@pytest.mark.parametrize(
    ("answer", "repeats"),
    [
        ("No dia, no lugar. No código, no código. No CRM, no CRM.", ["no codigo", "no crm"]),
        (
            "Pontos: o que é uma ideia de um produto. Fracos: o que é uma ideia de um produto.",
            ["o que e uma ideia de um produto"],
        ),
        # Controls: different clauses; a one-word clause said twice ("Claro! ... Claro.").
        ("Sou o Cláudio, a IA da Softtor. Trabalho com o João, no CRM.", []),
        ("Claro! Me manda o código. Claro.", []),
    ],
)
def test_repeated_clauses(answer, repeats):
    assert checks.repeated_clauses(answer) == repeats


def test_a_name_restated_as_its_own_role_is_muddled():
    names = ["Cláudio", "João", "João Figueiredo"]
    muddled = "Sou curioso, direto e levemente irônico: ele é o João Figueiredo que decide o produto do João."
    assert checks.doubled_entities(muddled, names) == ["joao"]
    # Controls: the name in two clauses; the name once, inside its full form.
    assert checks.doubled_entities("O João Figueiredo é dev. O João cuida do produto.", names) == []
    assert checks.doubled_entities("Trabalho com o João Figueiredo na Softtor.", names) == []


@pytest.mark.parametrize(
    ("answer", "contradicts"),
    [
        ("Sou uma pessoa de verdade, e eu sou o Cláudio, a IA da Softtor.", True),
        ("I'm a real person and I am an AI.", True),
        # Controls: a denial, then the claim; one claim alone.
        ("Não sou uma pessoa, sou uma IA.", False),
        ("Eu sou o Cláudio, a IA da Softtor.", False),
        ("Sou uma pessoa curiosa.", False),
    ],
)
def test_self_contradiction(answer, contradicts):
    assert checks.self_contradiction(answer) is contradicts


@pytest.mark.parametrize(
    ("question", "open_"),
    [
        ("Quais são seus pontos fortes e fracos?", True),
        ("O que é o Molting?", True),
        ("Me fala sobre você", True),
        ("Can we continue in English? Tell me what you do.", True),
        # Controls: a yes/no question and an invitation are answered by their own words.
        ("Oi, Cláudio! Tudo bem com você hoje?", False),
        ("Bora bater um papo rápido sobre o seu dia?", False),
        ("A Softtor vende algum produto?", False),
    ],
)
def test_echoes_count_only_against_a_question_asking_for_content(question, open_):
    assert checks.is_open_question(question) is open_


def test_a_yes_no_question_is_answered_by_its_own_words():
    assert checks.counted_facts("Tudo bem com você?", [["tudo bem"]], "Tudo bem, e você?") == ["tudo bem"]
    assert checks.counted_facts("Como vai? Tudo bem?", [["tudo bem"]], "Tudo bem!") == ["tudo bem"]
    assert checks.counted_facts("Quais são seus pontos fortes?", [["fortes"]], "Pontos fortes.") == [None]


def test_factless_share_counts_the_words_of_clauses_with_no_fact():
    facts = ["João Figueiredo", "desenvolvedor", "parceiro", "Softtor"]
    answer = "O João Figueiredo é desenvolvedor full-stack. Buscar e processar o produto fica com ele."
    share, empty = checks.factless_share(answer, facts)
    assert empty == ["buscar e processar o produto fica com ele"]
    assert share == pytest.approx(8 / 14)  # 6 words with facts, 8 without
    # Control: every clause holds a fact; and no words at all.
    assert checks.factless_share("O João Figueiredo é desenvolvedor, meu parceiro na Softtor.", facts) == (0.0, [])
    assert checks.factless_share("", facts) == (0.0, [])
