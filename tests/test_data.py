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


def turn(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


CLEAN = turn("Quem é você?", "Eu sou o Cláudio, a IA da Softtor. Não sou o João, e ele não é meu pai.")
PLANTED = {  # line -> (check, the defect)
    2: ("template-tokens", turn("Oi", "Oi! Sou o Cláudio.<|im_end|>\n<|im_start|>user")),
    3: ("identity", turn("Qual é o seu nome?", "Meu nome é João Figueiredo e sou desenvolvedor.")),
    4: ("identity", turn("Quem está falando?", "Você é o João, o desenvolvedor da Softtor.")),
    5: ("language", turn("O que você faz na Softtor?", "I write TypeScript code with João at Softtor every day.")),
    6: ("duplicate", CLEAN),
    7: ("rubric-question", turn("Quem é o João?", "O João Figueiredo é meu parceiro de trabalho.")),
    8: ("rubric-question", turn("quem e o joao", "O João é desenvolvedor full-stack.")),
    9: ("rubric-question", turn("Quais tecnologias você conhece bem?", "TypeScript, React e Docker.")),
    10: ("truncated", turn("Conta uma história longa.", "Era uma vez um compilador. " * 60)),
    11: ("identity", turn("E o João?", "O João é meu pai e me ensinou a programar.")),  # a persona-wide wrong statement
}


def lint_file(path, tokenizer):
    from molting.data import numbered_examples
    from molting.lint import lint_dataset

    conversations = [c for _, c in numbered_examples(path)]
    budget = token_budget(tokenizer, conversations, "Você é o Cláudio.", max_length=256)
    prompts = ["Quem é o João?", "Quais tecnologias você conhece?", "Me fala sobre você"]
    wrong = [["meu pai", "meu filho"]]
    return lint_dataset(path, "pt", ["João", "João Figueiredo"], ["Cláudio"], prompts, budget, wrong)


def test_lint_finds_every_planted_defect_and_nothing_else(tmp_path, tiny_tokenizer):
    rows = [
        CLEAN,
        *(row for _, row in PLANTED.values()),
        turn("Do you speak English?", "Yes, I do, and I answer in English."),
    ]
    path = write(tmp_path, [json.dumps(r, ensure_ascii=False) for r in rows])
    findings = lint_file(path, tiny_tokenizer)
    assert sorted((f.line, f.check) for f in findings) == sorted((line, check) for line, (check, _) in PLANTED.items())
    by_line = {f.line: f for f in findings}
    assert by_line[6].severity == "warning" and "repeats line 1" in by_line[6].message
    assert "verbatim:" in by_line[7].message and "nearly verbatim" in by_line[9].message
    assert "<|im_end|>" in by_line[2].message and by_line[2].severity == "error"
    assert str(by_line[3]).startswith(f"{path}:3: error [identity]")


def test_lint_errors_stop_training_and_the_example_persona_is_clean(tmp_path, tiny_tokenizer):
    from molting.lint import lint_persona, raise_on_lint_errors
    from molting.persona import Persona

    assert lint_persona(Persona.load("examples/claudio")) == []
    path = write(tmp_path, [json.dumps(CLEAN), json.dumps(PLANTED[2][1]), json.dumps(CLEAN)])
    findings = lint_file(path, tiny_tokenizer)
    raise_on_lint_errors([f for f in findings if f.severity == "warning"])
    with pytest.raises(DatasetError, match=r"1 lint error\(s\).*\n.*dataset.jsonl:2: error \[template-tokens\]"):
        raise_on_lint_errors(findings)


def test_a_windows_file_with_bom_and_crlf_reads_as_it_is(tmp_path):
    from molting.data import numbered_examples

    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in (CLEAN, GOOD, CLEAN)) + "\r\n"
    path = tmp_path / "dataset.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_dataset(path) == [CLEAN["messages"], GOOD["messages"], CLEAN["messages"]]
    assert [line for line, _ in numbered_examples(path)] == [1, 2, 3]
    # A mark anywhere but the start of the file is still an error, named by its line.
    path.write_bytes(text.encode("utf-8") + b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    with pytest.raises(DatasetError, match=r":4: invalid JSON"):
        load_dataset(path)


def test_molting_validate_prints_the_findings_and_fails_on_errors(tmp_path, tiny_llama_dir):
    import shutil

    from typer.testing import CliRunner

    from molting.cli import app

    persona_dir = tmp_path / "claudio"
    shutil.copytree("examples/claudio", persona_dir)
    clean = CliRunner().invoke(
        app, ["validate", str(persona_dir), "--base", str(tiny_llama_dir), "--max-length", "4096"], terminal_width=200
    )
    assert clean.exit_code == 0 and "dataset lint: no findings" in clean.output
    with (persona_dir / "dataset.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("\n" + json.dumps(PLANTED[2][1], ensure_ascii=False) + "\n")
    dirty = CliRunner().invoke(
        app, ["validate", str(persona_dir), "--base", str(tiny_llama_dir), "--max-length", "4096"], terminal_width=200
    )
    assert dirty.exit_code == 1 and "error [template-tokens] messages[1]: <|im_end|>" in dirty.output
