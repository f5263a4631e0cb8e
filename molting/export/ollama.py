"""The Ollama Modelfile written beside a GGUF: ``ollama create <name> -f Modelfile``.

Facts about Ollama's Modelfile reader (``parser/parser.go`` in ollama/ollama, read for
them, not copied), which decide how a string must be written:

- A command's value runs to the first line break at which the value read so far, with
  surrounding white space trimmed, is complete: unquoted, ``"..."``, or ``\"\"\"...\"\"\"``
  (at least six characters, ending in ``\"\"\"``). A space or tab never ends a value.
- There are no escapes: ``\\"`` is two characters, read back as they are.
- Characters that are not printable in Go's sense (``strconv.IsPrint``: letters, marks,
  numbers, punctuation, symbols and the ASCII space), other than tab and line breaks,
  are dropped: a no-break space, a zero-width joiner, a control character.

So a system prompt is written between ``\"\"\"`` as it is, and refused when Ollama would
read something else back: a line that ends in ``\"\"\"`` (the reader would end ``SYSTEM``
there and read the next lines as commands, ``ADAPTER``, ``PARAMETER``...) or a
character the reader drops. No quoting form can carry either.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from molting.errors import ExportError

LINE_BREAKS = "\r\n"
TRIMMED = " \t\r\n"  # the white space a value may hold; Go's TrimSpace removes it at the ends


def modelfile_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as a ``\"\"\"`` Modelfile string, or None when it can."""
    for index, char in enumerate(text):
        if char not in TRIMMED and not _go_printable(char):
            line = text.count("\n", 0, index) + 1
            name = unicodedata.name(char, "unnamed")
            return f"line {line} holds U+{ord(char):04X} ({name}), which Ollama's Modelfile reader drops"
        if char in LINE_BREAKS:
            read = ('"""' + text[:index]).rstrip(TRIMMED)
            if len(read) >= 6 and read.endswith('"""'):
                line = text.count("\n", 0, index) + 1
                return f'line {line} ends with """, where Ollama\'s Modelfile reader would end the string'
    return None


def quote(text: str, what: str) -> str:
    """``text`` as a Modelfile string that Ollama reads back exactly: ``\"\"\"text\"\"\"``.

    Args:
        text: the value (a system prompt).
        what: its name, for the error ("the system prompt").

    Raises:
        ExportError: ``text`` cannot be written so (see ``modelfile_problem``).
    """
    problem = modelfile_problem(text)
    if problem is not None:
        raise ExportError(f"{what} cannot be written into an Ollama Modelfile: {problem}")
    return f'"""{text}"""'


def modelfile(gguf_name: str, system: str, parameters: dict[str, float | int]) -> str:
    """The text of a Modelfile: ``FROM ./<gguf_name>``, ``SYSTEM``, one ``PARAMETER`` per item.

    Raises:
        ExportError: the system prompt or the file name cannot be written (see ``quote``).
    """
    if any(c in TRIMMED or c == '"' or not _go_printable(c) for c in gguf_name):
        raise ExportError(f"{gguf_name!r}: a GGUF name with white space or quotes cannot follow FROM")
    lines = [f"FROM ./{gguf_name}", f"SYSTEM {quote(system, 'the system prompt')}"]
    lines += [f"PARAMETER {key} {value:g}" for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, system: str, parameters: dict[str, float | int]) -> Path:
    """Write ``modelfile(...)`` to ``path`` atomically; nothing is written when it raises."""
    from molting.io import atomic_path

    text = modelfile(gguf_name, system, parameters)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _go_printable(char: str) -> bool:
    """Go's ``unicode.IsPrint``: a letter, mark, number, punctuation or symbol, or the ASCII space."""
    return char == " " or unicodedata.category(char)[0] in "LMNPS"
