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
