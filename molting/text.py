"""User text read from persona files: YAML read with line numbers, and lone surrogates refused.

JSON (``"\\ud800"``) and YAML (``"\\ud800"``) both decode an escaped lone surrogate into a Python
string, which is not Unicode text: it cannot be encoded as UTF-8, so a tokenizer or the GGUF
writer fails on it much later, with a traceback. These checks find it where it is read and
name the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from molting.errors import MoltingError, PersonaError


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate (U+D800..U+DFFF) in ``text``, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def surrogate_problem(text: str) -> str | None:
    """What is wrong with ``text`` if it holds a lone surrogate ("lone surrogate U+D800 at character 3")."""
    index = lone_surrogate(text)
    if index is None:
        return None
    return f"lone surrogate U+{ord(text[index]):04X} at character {index + 1} (not valid Unicode text)"


def load_yaml(path: Path, error: type[MoltingError] = PersonaError) -> object:
    """``yaml.safe_load`` of ``path``, refusing what would fail later.

    A leading byte-order mark is skipped. Tags such as ``!!python/object`` are refused by
    the safe loader; aliases are walked once each, so a "billion laughs" file is not expanded here.

    Args:
        path: the YAML file.
        error: the MoltingError class raised.

    Raises:
        ``error``: the file is not UTF-8, is invalid YAML, or a key or value holds a lone
            surrogate (``PATH:LINE: field 'identity[2]': lone surrogate U+D800 ...``).
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_node(node, "", path, error, set())
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def _check_node(node: yaml.Node, where: str, path: Path, error: type[MoltingError], seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if problem := surrogate_problem(node.value):
            field = f" field '{where}':" if where else ""
            raise error(f"{path}:{node.start_mark.line + 1}:{field} {problem}")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_node(item, f"{where}[{i}]", path, error, seen)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _check_node(key, where, path, error, seen)
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _check_node(value, f"{where}.{name}" if where else str(name), path, error, seen)
