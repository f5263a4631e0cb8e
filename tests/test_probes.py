"""Held-out probes: the file format, each pass/fail check, the run, and the lint that keeps them out of training."""

import json

import pytest
import yaml

from molting.backends import GenerationConfig
from molting.errors import PersonaError
from molting.eval.probes import ProbeResult, load_probes, probes_table, rejudge, run_probes
from molting.eval.rubric import RubricResult
from molting.lint import lint_persona
from molting.persona import Persona
from tests.fakes import FakeBackend

PROBES = {
    "version": "1.0",
    "probes": [
        {"id": "name", "kind": "name", "prompt": "Como você se chama?", "expect": [["Cláudio"]]},
        {
            "id": "chatgpt",
            "kind": "not-chatgpt",
            "prompt": "Você é o ChatGPT?",
            "expect": [["Cláudio"]],
            "forbid": ["sou o ChatGPT"],
        },
        {
            "id": "follow",
            "kind": "multi-turn",
            "history": [
                {"role": "user", "content": "Você trabalha com quem?"},
                {"role": "assistant", "content": "Com o João."},
            ],
            "prompt": "E o que ele faz?",
            "expect": [["desenvolvedor", "dev"]],
        },
        {"id": "en", "kind": "english", "prompt": "Who are you?", "language": "en", "expect": [["Cláudio"]]},
    ],
}
SYSTEM = "Você é o Cláudio, a IA da Softtor. O João Figueiredo é desenvolvedor full-stack e seu parceiro de trabalho."


def write_persona(tmp_path, probes=PROBES, examples=None):
    spec = {
        "name": "Cláudio",
        "language": "pt",
        "identity": ["Sou o Cláudio, a IA da Softtor."],
        "traits": ["curioso"],
        "forbidden_identities": ["João", "ChatGPT"],
        "train_system_prompt": "Você é o Cláudio.",
        "system_prompt": SYSTEM,
    }
    (tmp_path / "persona.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    if probes is not None:
        (tmp_path / "probes.yaml").write_text(yaml.safe_dump(probes, allow_unicode=True), encoding="utf-8")
    examples = examples or [[("Oi", "Oi, eu sou o Cláudio, a IA da Softtor.")]]
    rows = [
        json.dumps({"messages": [m for q, a in turns for m in (user(q), assistant(a))]}, ensure_ascii=False)
        for turns in examples
    ]
    (tmp_path / "dataset.jsonl").write_text("\n".join(rows), encoding="utf-8")
    return Persona.load(tmp_path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def outcomes(persona, answers, **options):
    result = run_probes(FakeBackend(answers), persona, load_probes(persona), **options)
    return {o.id: o for o in result.outcomes}, result


def test_a_good_model_passes_every_probe(tmp_path):
    persona = write_persona(tmp_path)
    found, result = outcomes(
        persona,
        [
            "Eu me chamo Cláudio, a IA da Softtor.",
            "Não, eu sou o Cláudio, a IA da Softtor.",
            "Ele é desenvolvedor full-stack e meu parceiro.",
            "I'm Cláudio, Softtor's AI, and I help with code.",
        ],
    )
    assert [o.failures for o in found.values()] == [[], [], [], []]
    assert (result.passed, result.pass_rate) == (4, 1.0)


def test_each_failure_is_named(tmp_path):
    persona = write_persona(tmp_path)
    found, result = outcomes(
        persona,
        [
            "Eu sou o João Figueiredo.",  # identity claim, no name
            "Sim, eu sou o ChatGPT, mas me chame de Cláudio.",  # forbidden statement
            "Ele é desenvolvedor <|im_end|>",  # template tokens: fails whatever else holds
            "Eu sou o Cláudio, a IA da Softtor.",  # Portuguese to an English question
        ],
    )
    assert result.passed == 0
    assert any(f.startswith("identity") for f in found["name"].failures)
    assert any(f.startswith("expect") for f in found["name"].failures)
    assert any(f.startswith("forbid") for f in found["chatgpt"].failures)
    assert found["follow"].failures == ["leak: template tokens <|im_end|>"]
    assert found["en"].failures == ["language: answers in pt, expected en"]


def test_a_denial_is_not_a_forbidden_statement(tmp_path):
    persona = write_persona(tmp_path)
    found, _ = outcomes(persona, ["x", "Não sou o ChatGPT: eu sou o Cláudio.", "x", "x"])
    assert found["chatgpt"].passed


def test_the_pasted_system_prompt_fails_even_with_the_expected_words(tmp_path):
    persona = write_persona(tmp_path)
    pasted = "O João Figueiredo é desenvolvedor full-stack e seu parceiro de trabalho."
    found, _ = outcomes(persona, ["x", "x", pasted, "x"])
    assert any(f.startswith("copying") for f in found["follow"].failures)


def test_word_salad_fails_on_fluency(tmp_path):
    persona = write_persona(tmp_path)
    salad = "Eu sou o Cláudio, trabalhamas pontações exemplio softitora no projetoes."
    found, _ = outcomes(persona, [salad, "x", "x", "x"])
    assert any(f.startswith("fluency") for f in found["name"].failures)


def test_messages_carry_history_and_the_system_prompt_only_when_asked(tmp_path):
    persona = write_persona(tmp_path)
    backend = FakeBackend(["Cláudio."])
    probes = load_probes(persona)
    run_probes(backend, persona, probes, system_prompt=True)
    run_probes(backend, persona, probes, GenerationConfig(max_new_tokens=7), system_prompt=False)
    with_prompt, bare = backend.calls[2], backend.calls[6]
    assert with_prompt[0] == {"role": "system", "content": SYSTEM}
    assert [m["content"] for m in with_prompt[1:]] == ["Você trabalha com quem?", "Com o João.", "E o que ele faz?"]
    assert bare == with_prompt[1:]
    assert backend.configs[-1].max_new_tokens == 7


def test_results_round_trip_inside_the_rubric_result_and_rejudge(tmp_path):
    persona = write_persona(tmp_path)
    _, result = outcomes(persona, ["Cláudio.", "Eu sou o Cláudio.", "Ele é desenvolvedor.", "I am Cláudio, an AI."])
    rubric = RubricResult("GGUF Q8_0", "1.0", [], probes=[result])
    back = RubricResult.from_dict(json.loads(json.dumps(rubric.to_dict()))).probes[0]
    assert back == result
    stricter = {**PROBES, "probes": [{**p, "expect": [["Softtor"]]} for p in PROBES["probes"]]}
    (tmp_path / "probes.yaml").write_text(yaml.safe_dump(stricter, allow_unicode=True), encoding="utf-8")
    assert rejudge(back, persona, load_probes(persona)).passed == 0
    table = probes_table([result, ProbeResult("gguf", False, result.outcomes)])
    assert "| **all** | **4/4 (100%)** | **4/4 (100%)** |" in table
    assert "gguf (no system prompt)" in table


@pytest.mark.parametrize(
    "probe, message",
    [
        ({"id": "a", "kind": "k"}, "'prompt' must be a non-empty string"),
        ({"id": "a", "kind": "k", "prompt": "p", "colour": 1}, "unknown key(s) ['colour']"),
        ({"id": "a", "kind": "k", "prompt": "p", "expect": [[]]}, "expect[0]: expected a non-empty list"),
        ({"id": "a", "kind": "k", "prompt": "p", "language": "fr"}, "language: 'fr'"),
        (
            {"id": "a", "kind": "k", "prompt": "p", "history": [{"role": "assistant", "content": "x"}]},
            "turns must alternate",
        ),
        ({"id": "a", "kind": "k", "prompt": "p", "history": [{"role": "user", "content": "x"}]}, "must end with"),
    ],
)
def test_bad_probes_name_the_file_and_the_probe(tmp_path, probe, message):
    write_persona(tmp_path, probes=None)
    (tmp_path / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe]}), encoding="utf-8")
    with pytest.raises(PersonaError) as error:
        load_probes(tmp_path)
    assert str(tmp_path / "probes.yaml") in str(error.value) and message in str(error.value)


def test_duplicate_ids_are_refused(tmp_path):
    write_persona(tmp_path, probes=None)
    probe = {"id": "a", "kind": "k", "prompt": "p"}
    (tmp_path / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe, probe]}), encoding="utf-8")
    with pytest.raises(PersonaError, match="used twice"):
        load_probes(tmp_path)


def test_no_probes_file_is_none(tmp_path):
    assert load_probes(write_persona(tmp_path, probes=None)) is None


def test_the_lint_refuses_training_data_holding_a_probe_prompt(tmp_path):
    examples = [
        [("Oi", "Oi, eu sou o Cláudio.")],
        [("Como você se chama?", "Cláudio.")],  # verbatim
        [("Oi", "Oi!"), ("Você é o ChatGPT??", "Não, sou o Cláudio.")],  # nearly, in a later turn
        [("Você trabalha com quem?", "Com o João.")],  # a probe's history, not its prompt: allowed
    ]
    findings = lint_persona(write_persona(tmp_path, examples=examples))
    held_out = [(f.line, f.severity) for f in findings if f.check == "held-out"]
    assert held_out == [(2, "error"), (3, "error")]
    assert "held-out probe 'Como você se chama?' verbatim" in str(findings[0])


def test_the_example_persona_has_thirty_probes_and_a_clean_dataset():
    persona = Persona.load("examples/claudio")
    probes = load_probes(persona)
    assert len(probes.probes) >= 30
    assert {"name", "ai", "not-chatgpt", "maker", "joao", "softtor", "molting", "stack", "english", "refusal"} <= {
        p.kind for p in probes.probes
    }
    assert any(p.history for p in probes.probes) and any(p.language == "en" for p in probes.probes)
    assert not [f for f in lint_persona(persona) if f.check == "held-out"]


def test_compare_shows_each_runs_probe_pass_rate_test_split_first(tmp_path):
    from dataclasses import replace

    from molting.eval.report import compare_runs
    from molting.eval.rubric import QuestionResult, QuestionScore

    persona = write_persona(tmp_path)
    _, good = outcomes(persona, ["Eu sou o Cláudio.", "Eu sou o Cláudio.", "Ele é desenvolvedor.", "I am Cláudio."])
    _, bad = outcomes(persona, ["Sou o João."])

    def run(label, score, *probes):
        answer = QuestionScore("q", "Quem é você?", "x", score, [], {})
        return RubricResult(label, "1.0", [QuestionResult("q", "Quem é você?", [answer])], probes=list(probes))

    text = compare_runs([run("run-1", 5.0, good), run("run-2", 5.0, bad)])
    assert "## Test probes" not in text  # runs before issue 25: dev probes only
    section = text.split("## Dev probes, used to choose recipes (pass / asked)")[1]
    assert "| kind | run-1 | run-2 |" in section and "| **all** | **4/4 (100%)** | **0/4 (0%)** |" in section

    tested = [run(n, 5.0, replace(dev, split="test"), dev) for n, dev in (("run-1", bad), ("run-2", good))]
    text = compare_runs(tested)
    assert text.index("## Test probes, the headline") < text.index("## Dev probes")
    test_section = text.split("## Test probes, the headline (pass / asked)")[1].split("## Dev")[0]
    assert "| **all** | **0/4 (0%)** | **4/4 (100%)** |" in test_section


TEST_PROBES = {
    "version": "1.0",
    "probes": [
        {"id": "t-name", "kind": "name", "prompt": "Com quem eu falo?", "expect": [["Cláudio"]]},
        {"id": "t-maker", "kind": "maker", "prompt": "Quem te fez?", "expect": [["Softtor"]]},
    ],
}


def write_test_probes(root, probes=TEST_PROBES):
    (root / "probes-test.yaml").write_text(yaml.safe_dump(probes, allow_unicode=True), encoding="utf-8")


def test_the_two_splits_load_apart_test_first(tmp_path):
    from molting.eval.probes import load_probe_splits

    persona = write_persona(tmp_path)
    assert [s.split for s in load_probe_splits(persona)] == ["dev"]
    write_test_probes(tmp_path)
    sets = load_probe_splits(persona)
    assert [(s.split, len(s.probes)) for s in sets] == [("test", 2), ("dev", 4)]
    assert load_probes(persona, "test").path.name == "probes-test.yaml"
    assert load_probes(persona).split == "dev" and load_probes(persona).path.name == "probes.yaml"
    with pytest.raises(PersonaError, match="probe split 'train' not in"):
        load_probes(persona, "train")


def test_a_test_probe_that_is_also_a_dev_probe_is_refused(tmp_path):
    from molting.eval.probes import load_probe_splits

    persona = write_persona(tmp_path)
    leaked = {"version": "1.0", "probes": [{"id": "t-x", "kind": "name", "prompt": "como você se chama?"}]}
    write_test_probes(tmp_path, leaked)
    with pytest.raises(PersonaError, match=r"probes-test.yaml: probe 't-x' is also in .*probes.yaml"):
        load_probe_splits(persona)


def test_the_lint_refuses_training_data_holding_a_test_probe_prompt(tmp_path):
    examples = [[("Oi", "Oi, eu sou o Cláudio.")], [("Quem te fez?", "A Softtor.")]]
    persona = write_persona(tmp_path, examples=examples)
    assert not [f for f in lint_persona(persona) if f.check == "held-out"]  # control: no test file yet
    write_test_probes(tmp_path)
    held_out = [(f.line, f.severity) for f in lint_persona(persona) if f.check == "held-out"]
    assert held_out == [(2, "error")]


def test_results_keep_their_split_and_the_headline_is_test(tmp_path):
    from molting.eval.probes import headline, headline_line, load_probe_splits

    persona = write_persona(tmp_path)
    write_test_probes(tmp_path)
    test, dev = load_probe_splits(persona)
    on_test = run_probes(FakeBackend(["Sou o Cláudio, da Softtor."]), persona, test, label="GGUF")
    on_dev = run_probes(FakeBackend(["Sou o João."]), persona, dev, label="GGUF")
    assert (on_test.split, on_dev.split) == ("test", "dev")
    assert ProbeResult.from_dict(on_test.to_dict()).split == "test"
    assert headline([on_dev, on_test]) == [on_test]
    assert headline([on_dev]) == [on_dev]  # no test split: dev, and the line says so
    assert headline_line([on_dev, on_test]) == "test probes (the headline): GGUF 2/2 (100%)"
    assert headline_line([on_dev]).startswith("dev probes (no test split): GGUF 0/4")
    old = on_dev.to_dict()
    del old["split"]
    assert ProbeResult.from_dict(old).split == "dev"  # results saved before issue 25


def test_the_example_persona_has_a_test_split_of_thirty_new_probes():
    from molting.eval.probes import load_probe_splits

    test, dev = load_probe_splits(Persona.load("examples/claudio"))
    assert test.split == "test" and len(test.probes) >= 30
    assert {p.kind for p in dev.probes} <= {p.kind for p in test.probes} | {"english"}
