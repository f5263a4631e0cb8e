import json

import pytest

from molting.data import load_dataset, token_budget, with_system_prompt
from molting.errors import DatasetError

GOOD = {"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá!"}]}


def write(tmp_path, lines: list[str | bytes]):
    path = tmp_path / "dataset.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return path


def test_loads_valid_lines_and_skips_blank(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)])
    assert load_dataset(path) == [GOOD["messages"], GOOD["messages"]]


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('{"messages": [', None, "invalid JSON"),
        ('{"conversation": []}', "messages", "expected an object"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role", "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "  "}]}', "messages[0].content", "empty"),
        ('{"messages": [{"role": "user", "content": "Oi"}]}', "messages", "no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
            "messages[1].role",
            "only come first",
        ),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, field, words):
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), line])
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert info.value.line == 3
    assert info.value.field == field
    assert f"{path}:3:" in str(info.value)
    assert words in str(info.value)


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD), b'{"messages": "\xff\xfe"}'])
    with pytest.raises(DatasetError, match=r":2: not UTF-8"):
        load_dataset(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(write(tmp_path, ["", ""]))


def test_system_prompt_is_prepended_only_when_absent():
    own = [{"role": "system", "content": "S"}, *GOOD["messages"]]
    assert with_system_prompt(GOOD["messages"], "P")[0] == {"role": "system", "content": "P"}
    assert with_system_prompt(own, "P") == own


def test_token_budget_counts_with_the_chat_template(tiny_tokenizer):
    short = GOOD["messages"]
    long = [{"role": "user", "content": "palavra " * 300}, {"role": "assistant", "content": "ok"}]
    system = "Você é o Cláudio, IA da Softtor. " * 3
    report = token_budget(tiny_tokenizer, [short, long], system, max_length=128)

    rendered = tiny_tokenizer.apply_chat_template(with_system_prompt(short, system), tokenize=True, return_dict=True)
    assert report.lengths[0] == len(rendered["input_ids"])
    assert report.system_tokens < report.lengths[0]
    assert report.answer_room == 128 - report.system_tokens
    assert [index for index, _ in report.over] == [2]
    assert report.over[0][1] == report.lengths[1] - 128
    summary = report.summary()
    assert summary["truncated_examples"] == 1 and summary["tokens_max"] == report.lengths[1]


def test_the_example_persona_fits_its_budget(tiny_tokenizer):
    from molting.persona import Persona

    persona = Persona.load("examples/claudio")
    report = token_budget(tiny_tokenizer, persona.examples, persona.train_system_prompt, 4096)
    assert len(persona.examples) >= 100
    assert report.over == []
