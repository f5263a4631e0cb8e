import pytest
import yaml

from molting.errors import DatasetError, PersonaError
from molting.persona import Persona

SPEC = {
    "name": "Cláudio",
    "language": "pt",
    "identity": ["Sou o Cláudio, a IA da Softtor."],
    "traits": ["curioso"],
    "train_system_prompt": "Você é o Cláudio.",
    "system_prompt": "Você é o Cláudio, IA da Softtor.",
}


def make(
    tmp_path,
    spec=SPEC,
    dataset='{"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá"}]}',
):
    (tmp_path / "persona.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    if dataset is not None:
        (tmp_path / "dataset.jsonl").write_text(dataset, encoding="utf-8")
    return tmp_path


def test_example_persona_loads():
    persona = Persona.load("examples/claudio")
    assert persona.name == "Cláudio" and persona.slug == "claudio"
    assert "João" in persona.forbidden_identities
    assert len(persona.examples) >= 100
    assert persona.messages("Oi")[0] == {"role": "system", "content": persona.system_prompt}


def test_unknown_key_is_rejected_with_the_allowed_set(tmp_path):
    with pytest.raises(PersonaError, match=r"unknown key\(s\) \['nmae'\]; allowed"):
        Persona.load(make(tmp_path, {**SPEC, "nmae": "x"}))


def test_missing_key_and_bad_language(tmp_path):
    spec = {k: v for k, v in SPEC.items() if k != "system_prompt"}
    with pytest.raises(PersonaError, match="system_prompt"):
        Persona.load(make(tmp_path, spec))
    with pytest.raises(PersonaError, match="language 'klingon'"):
        Persona.load(make(tmp_path, {**SPEC, "language": "klingon"}))


def test_missing_directory_names_the_file(tmp_path):
    with pytest.raises(PersonaError, match="persona.yaml: not found"):
        Persona.load(tmp_path / "nobody")


def test_broken_dataset_line_surfaces_with_its_line(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.jsonl:1:"):
        Persona.load(make(tmp_path, dataset="{not json"))


def test_chat_goes_through_the_given_backend(tmp_path):
    from tests.fakes import FakeBackend

    persona = Persona.load(make(tmp_path))
    backend = FakeBackend(answers=["Eu sou o Cláudio."])
    assert persona.chat("Quem é você?", model=backend) == "Eu sou o Cláudio."
    assert backend.calls[0][0] == {"role": "system", "content": persona.system_prompt}


def test_chat_decodes_as_the_rubric_does_unless_told_otherwise(tmp_path):
    """persona.chat answers as `molting run` evaluated: greedy, repetition_penalty 1.1."""
    from molting.pipeline import RunConfig
    from tests.fakes import FakeBackend

    persona = Persona.load(make(tmp_path))
    backend = FakeBackend(answers=["Eu sou o Cláudio."])
    persona.chat("Quem é você?", model=backend)
    persona.chat("Quem é você?", model=backend, repetition_penalty=1.0, max_new_tokens=7)
    assert backend.configs[0] == RunConfig().generation
    assert (backend.configs[0].temperature, backend.configs[0].repetition_penalty) == (0.0, 1.1)
    assert (backend.configs[1].repetition_penalty, backend.configs[1].max_new_tokens) == (1.0, 7)
