"""Chat datasets: loading, validation, and the token budget.

The format is TRL's conversational format, one JSON object per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

The token budget exists because of the research log's phase 7: a 339-token system
prompt inside ``max_length=512`` left ~143 tokens for the answer, and the answers
the model learned were cut. :func:`token_budget` counts with the model's own
tokenizer and chat template, before any training step runs.

The lint that reads the answers for what a model should not learn lives one room up, in
:mod:`molting.lint` (it needs the rubric's questions and the probes' prompts).

A file saved by a Windows editor (UTF-8 byte-order mark, CRLF line ends) is read as it is.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molting.errors import DatasetError
from molting.text import surrogate_problem

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"


def load_dataset(path: str | Path) -> list[Conversation]:
    """Read and validate a chat JSONL file.

    Blank lines are skipped. A ``system`` turn is allowed only first.

    Returns:
        One list of ``{"role", "content"}`` dicts per line.

    Raises:
        DatasetError: naming the file, the 1-based line and the field, for: bytes that
            are not UTF-8, invalid JSON, a missing or non-list ``messages``, an unknown
            role, empty content, a lone surrogate, turns out of order (an assistant turn first,
            two user turns in a row), or a conversation without an assistant turn.
    """
    return [conversation for _, conversation in numbered_examples(path)]


def numbered_examples(path: str | Path) -> list[tuple[int, Conversation]]:
    """``load_dataset`` with each conversation's 1-based line number in the file.

    A leading UTF-8 byte-order mark is skipped and CRLF line ends are accepted
    (both are JSON whitespace once the mark is gone). Raises as ``load_dataset``.
    """
    path = Path(path)
    examples = [(number, parse_line(line, path, number)) for number, line in read_lines(path)]
    if not examples:
        raise DatasetError(path, None, "no examples")
    return examples


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their 1-based numbers, as text.

    A leading UTF-8 byte-order mark is skipped; CRLF line ends are left to the JSON parser
    (they are JSON whitespace).

    Raises:
        DatasetError: the file does not exist, or a line is not UTF-8 (naming line and byte).
    """
    if not path.is_file():
        raise DatasetError(path, None, "file not found")
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            raw = raw.removeprefix(BOM) if number == 1 else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(path, number, f"not UTF-8 (byte {exc.start})") from None
            if line.strip():
                yield number, line


def parse_line(line: str, path: Path, number: int) -> Conversation:
    """Parse one JSONL line into a conversation. Raises DatasetError (see load_dataset)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DatasetError(path, number, "expected an object with a list", field="messages")
    messages = record["messages"]
    for i, message in enumerate(messages):
        check_message(message, f"messages[{i}]", path, number, first=i == 0)
    check_turn_order(messages, "messages", path, number)
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(path, number, "no assistant turn to learn from", field="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_message(
    message: Any, where: str, path: Path, number: int, first: bool = False, roles: tuple[str, ...] = ROLES
) -> None:
    """Check one ``{"role", "content"}`` message of a JSONL line.

    Args:
        message: the decoded JSON value.
        where: its field path, for the error (``messages[2]``, ``chosen[0]``).
        path, number: the file and 1-based line, for the error.
        first: the message opens its conversation (the only place a ``system`` turn may be).
        roles: the roles allowed here.

    Raises:
        DatasetError: not an object, a role outside ``roles``, a late system turn, empty content.
    """
    if not isinstance(message, dict):
        raise DatasetError(path, number, "expected an object", field=where)
    role = message.get("role")
    if role not in roles:
        raise DatasetError(path, number, f"unknown role {role!r}; allowed: {roles}", f"{where}.role")
    if role == "system" and not first:
        raise DatasetError(path, number, "a system turn may only come first", f"{where}.role")
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise DatasetError(path, number, "empty or missing content", field=f"{where}.content")
    if problem := surrogate_problem(content):
        raise DatasetError(path, number, problem, field=f"{where}.content")


def check_turn_order(messages: list[dict], name: str, path: Path, number: int) -> None:
    """Check that checked messages alternate user, assistant, ... after an optional system turn.

    Raises:
        DatasetError: an assistant turn before any user turn, or two turns of one role in a
            row, naming the field (``messages[2].role``).
    """
    expected = "user"
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            continue
        if role != expected:
            problem = (
                "an assistant turn before any user turn"
                if expected == "user" and i == (messages[0]["role"] == "system")
                else f"two {role} turns in a row"
            )
            raise DatasetError(path, number, f"{problem}: turns alternate user, assistant, ...", f"{name}[{i}].role")
        expected = "assistant" if role == "user" else "user"


def with_system_prompt(conversation: Conversation, system_prompt: str) -> Conversation:
    """Prepend ``system_prompt`` unless the conversation brings its own system turn."""
    if conversation and conversation[0]["role"] == "system":
        return list(conversation)
    return [{"role": "system", "content": system_prompt}, *conversation]


@dataclass
class BudgetReport:
    """Token counts of a dataset under one tokenizer, chat template and ``max_length``.

    Attributes:
        max_length: the training sequence limit, in tokens.
        system_tokens: tokens of the system prompt rendered alone by the template.
        lengths: rendered tokens per example (system prompt included).
        over: (1-based example index, tokens over max_length) for each example that
            would be truncated.
    """

    max_length: int
    system_tokens: int
    lengths: list[int]
    over: list[tuple[int, int]] = field(default_factory=list)

    @property
    def answer_room(self) -> int:
        """Tokens left in max_length once the system prompt is in."""
        return self.max_length - self.system_tokens

    def summary(self) -> dict[str, Any]:
        """A JSON-able dict of the figures."""
        return {
            "max_length": self.max_length,
            "system_prompt_tokens": self.system_tokens,
            "room_after_system_prompt": self.answer_room,
            "examples": len(self.lengths),
            "tokens_min": min(self.lengths),
            "tokens_median": statistics.median(self.lengths),
            "tokens_max": max(self.lengths),
            "truncated_examples": len(self.over),
            "truncated": [{"example": i, "tokens_over": n} for i, n in self.over],
        }


def token_budget(tokenizer, conversations: list[Conversation], system_prompt: str, max_length: int) -> BudgetReport:
    """Count the tokens each example takes under ``tokenizer``'s chat template.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        conversations: validated conversations (see load_dataset).
        system_prompt: prepended to conversations without their own system turn.
        max_length: the training sequence limit, in tokens.
    """
    system_tokens = _count(tokenizer, [{"role": "system", "content": system_prompt}])
    lengths = [_count(tokenizer, with_system_prompt(c, system_prompt)) for c in conversations]
    over = [(i, n - max_length) for i, n in enumerate(lengths, start=1) if n > max_length]
    return BudgetReport(max_length, system_tokens, lengths, over)


def _count(tokenizer, messages: Conversation) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return len(ids)
