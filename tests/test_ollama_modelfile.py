"""The Ollama Modelfile round trip: what molting writes, Ollama's reader reads back exactly, or it is refused.

``read_modelfile`` below is a small reader written from the Modelfile grammar as Ollama's
``parser/parser.go`` implements it (facts, not its code): a command name of letters, then
for PARAMETER a name of letters, digits and ``_``, for MESSAGE a role; then a value that ends
at the first line break where the value read so far, trimmed, is complete (unquoted, ``"..."``
or ``\"\"\"...\"\"\"``); no escapes; characters Go does not count as printable dropped, except
tab and line breaks; ``#`` lines are comments.
"""

from __future__ import annotations

import unicodedata

import pytest

from molting.errors import ExportError
from molting.export.ollama import modelfile

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message"}
PARAMETERS = {"temperature": 0.7, "repeat_penalty": 1.1, "num_predict": 200}


class ModelfileSyntaxError(ValueError):
    pass


def _printable(char: str) -> bool:
    return char == " " or unicodedata.category(char)[0] in "LMNPS"


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def _word(text: str, i: int, allowed) -> tuple[str, int]:
    """Read a word of ``allowed`` characters ending at a space or tab; the index after that space."""
    start = i
    while i < len(text) and allowed(text[i]):
        i += 1
    if i == len(text) or text[i] not in " \t" or i == start:
        raise ModelfileSyntaxError(f"bad command or name at character {start}")
    return text[start:i], i + 1


def _value(text: str, i: int) -> tuple[str, int]:
    """Read a value from ``i``; returns it (unquoted) and the index after its line break."""
    buffer: list[str] = []
    while i < len(text):
        char = text[i]
        i += 1
        if char in " \t\r\n":
            value, complete = _unquote("".join(buffer).strip(" \t\r\n"))
            if complete and char in "\r\n":
                return value, i
            buffer.append(char)
        elif _printable(char):
            buffer.append(char)
    value, complete = _unquote("".join(buffer).strip(" \t\r\n"))
    if not complete:
        raise ModelfileSyntaxError("unexpected end of file inside a quoted value")
    return value, i


def read_modelfile(text: str) -> list[tuple[str, str]]:
    """``[(command, value)]`` as Ollama's reader sees them; PARAMETER as ``(name, value)``."""
    commands, i = [], 0
    while i < len(text):
        char = text[i]
        if char in " \t\r\n":
            i += 1
        elif char == "#":
            while i < len(text) and text[i] not in "\r\n":
                i += 1
        else:
            name, i = _word(text, i, lambda c: c.isascii() and c.isalpha())
            name = name.lower()
            if name not in COMMANDS:
                raise ModelfileSyntaxError(f"unknown command {name!r}")
            role = ""
            if name == "parameter":
                name, i = _word(text, i, lambda c: c.isascii() and (c.isalnum() or c == "_"))
            elif name == "message":
                role, i = _word(text, i, lambda c: c.isascii() and c.isalpha())
            value, i = _value(text, i)
            value = f"{role}: {value}" if role else value
            commands.append((name, value))
    return commands


HOSTILE = {
    "plain": "You are Ana.",
    "quotes inside a line": 'She said """hello""" and left.',
    "escaped quotes": 'A literal \\"\\"\\" stays as typed.',
    "ends with a quote": 'Say "yes"',
    "starts with a quote": '"Quoted" first word',
    "two quotes alone on a line": '""\nthen text',
    "quotes then space then break": 'line one """ \u0041\nline two',
    "commands as text": "# ADAPTER /tmp/evil.gguf\nPARAMETER num_ctx 1\nFROM evil\nSYSTEM again",
    "jinja": "{{ messages }}{% for m in messages %}{{ m.content }}{% endfor %}{{ ''.__class__ }}",
    "blank lines and tabs": "first\n\n\n\tindented\n   spaced   \nlast",
    "crlf": "one\r\ntwo",
    "accents and emoji": "Você é o Cláudio 🦞, ação!",
    "markup": "[bold]not bold[/bold] [/INST]",
    # refused: Ollama would end SYSTEM at the line break and read the rest as commands
    "injection": 'You are Ana.\nEnd"""""\nADAPTER /tmp/evil-lora.gguf\nPARAMETER num_ctx 1',
    "closing quotes then spaces": 'Line"""   \nADAPTER x',
    "closing quotes alone": '"""\nADAPTER x',
    "closing quotes before CR": 'a"""\rPARAMETER num_ctx 1',
    # refused: characters the reader drops
    "no-break space": "Olá,\u00a0mundo",
    "zero-width joiner": "family 👨\u200d👩\u200d👧",
    "control character": "bell \x07 here",
}
REFUSED = {
    "injection",
    "closing quotes then spaces",
    "closing quotes alone",
    "closing quotes before CR",
    "no-break space",
    "zero-width joiner",
    "control character",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_system_prompt_comes_back_unchanged_or_is_refused(name):
    prompt = HOSTILE[name]
    if name in REFUSED:
        with pytest.raises(ExportError, match=r"the system prompt cannot be written into an Ollama Modelfile: line \d"):
            modelfile("ana.Q4_K_M.gguf", prompt, PARAMETERS)
        return
    commands = read_modelfile(modelfile("ana.Q4_K_M.gguf", prompt, PARAMETERS))
    assert commands == [
        ("from", "./ana.Q4_K_M.gguf"),
        ("system", prompt),
        ("temperature", "0.7"),
        ("repeat_penalty", "1.1"),
        ("num_predict", "200"),
    ]


def test_the_reader_sees_the_old_escaping_injected():
    """Negative control: the escaping molting used before (\\"\\"\\") lets the injection through this reader."""
    prompt = HOSTILE["injection"]
    escaped = prompt.replace('"""', '\\"\\"\\"')
    old = f'FROM ./ana.gguf\nSYSTEM """{escaped}"""\n'
    commands = read_modelfile(old)
    assert ("adapter", "/tmp/evil-lora.gguf") in commands
    assert "num_ctx" in dict(commands)  # read as a PARAMETER command, not as the prompt's text
    assert dict(commands)["system"] != prompt


def test_reader_follows_the_documented_examples():
    text = (
        '# a comment\nFROM llama3.2\nPARAMETER temperature 1\nPARAMETER stop "<|im_end|>"\n'
        'SYSTEM """\nYou are Mario.\n"""\nMESSAGE user Is Toronto in Canada?\nLICENSE "MIT"\n'
    )
    assert read_modelfile(text) == [
        ("from", "llama3.2"),
        ("temperature", "1"),
        ("stop", "<|im_end|>"),
        ("system", "\nYou are Mario.\n"),
        ("message", "user: Is Toronto in Canada?"),
        ("license", "MIT"),
    ]
    with pytest.raises(ModelfileSyntaxError):
        read_modelfile('FROM x\nSYSTEM """never closed\n')


def test_a_run_writes_the_modelfile_it_checked(tmp_path):
    """pipeline's writer goes through the same function: the file on disk reads back."""
    from molting.backends.base import GenerationConfig
    from molting.persona import Persona
    from molting.pipeline import _write_modelfile

    prompt = HOSTILE["commands as text"]
    persona = Persona("Ana", "en", ["I am Ana."], ["calm"], "You are Ana.", prompt)
    _write_modelfile(persona, tmp_path / "ana.F16.gguf", GenerationConfig(), tmp_path)
    assert dict(read_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8")))["system"] == prompt
