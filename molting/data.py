"""Chat datasets: loading, validation, and the token budget.

The format is TRL's conversational format, one JSON object per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

The token budget exists because of the research log's phase 7: a 339-token system
prompt inside ``max_length=512`` left ~143 tokens for the answer, and the answers
the model learned were cut. :func:`token_budget` counts with the model's own
tokenizer and chat template, before any training step runs.

:func:`lint_dataset` reads the answers before training for what the research log and
issue 12 saw models learn from bad data: template tokens, forbidden identities, the wrong
language, duplicates, rubric questions in the training data, and truncated examples.

A file saved by a Windows editor (UTF-8 byte-order mark, CRLF line ends) is read as it is.
"""

from __future__ import annotations

import difflib
import json
import re
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from molting.errors import DatasetError
from molting.eval import checks
from molting.text import surrogate_problem

if TYPE_CHECKING:
    from molting.persona import Persona

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"
# A training prompt this similar to a rubric question (difflib ratio of the normalized texts)
# is "nearly verbatim": the rubric would measure recall of the dataset, not the persona.
NEAR_VERBATIM = 0.85


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


@dataclass(frozen=True)
class LintFinding:
    """One problem ``lint_dataset`` found.

    Attributes:
        path: the dataset file.
        line: 1-based line of the example.
        check: ``template-tokens``, ``identity``, ``language``, ``duplicate``, ``rubric-question``,
            ``held-out`` or ``truncated``.
        message: what is wrong, quoting the text.
        severity: "error" stops ``molting train`` and ``molting run``; "warning" is shown.
    """

    path: Path
    line: int
    check: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.severity} [{self.check}] {self.message}"


def lint_dataset(
    path: str | Path,
    language: str,
    forbidden: Iterable[str] = (),
    self_names: Iterable[str] = (),
    rubric_prompts: Iterable[str] = (),
    budget: BudgetReport | None = None,
    wrong: Iterable[Iterable[str]] = (),
    held_out: Iterable[str | tuple[str, str]] = (),
) -> list[LintFinding]:
    """Read every example of a dataset for what a model should not learn, before training.

    Errors: an answer holding template tokens (``<|im_end|>``, a bare ``assistant`` line),
    an answer claiming a forbidden identity in any person ("sou o João", "você é o João") or
    stating one of the rubric's persona-wide ``wrong`` statements ("o João é meu pai"; a denial,
    "o João não é meu pai", is not one),
    a user turn that is a rubric question or a held-out probe's prompt verbatim or nearly (difflib
    ratio >= ``NEAR_VERBATIM`` on normalized text). Warnings: an answer in neither the persona's language nor the
    language of the user's last question (not judged while no question's language is
    known: "Oi" alone tells nothing), an example repeated from an earlier line, an example
    the token budget truncates.

    Args:
        path: the JSONL dataset (read with ``numbered_examples``).
        language: the persona's language (ISO 639-1).
        forbidden: identities the persona must never claim (``forbidden_identities``).
        self_names: the persona's names, for third-person claims ("o Cláudio é o João").
        rubric_prompts: the evaluation questions.
        budget: ``token_budget`` of this dataset; its truncated examples become warnings.
        wrong: the rubric's persona-wide ``wrong`` phrase groups.
        held_out: the prompts of the held-out probes (``molting.eval.probes``), which training
            must never see (a probe's ``history`` is context, not held out), and the held-out
            conversations' user turns as ``(what, text)`` (see ``evaluation_prompts``).

    Returns:
        Findings in line order.

    Raises:
        DatasetError: the file cannot be read (see ``load_dataset``).
    """
    examples = numbered_examples(path)
    questions = evaluation_prompts(rubric_prompts, held_out)
    rules = Rules(list(forbidden), list(self_names), [list(g) for g in wrong])
    findings, seen = [], {}
    for index, (line, conversation) in enumerate(examples, start=1):
        found = lint_turns(labelled(conversation, "messages"), language, rules, questions)
        key = json.dumps(conversation, ensure_ascii=False)
        if key in seen:
            found.append(("duplicate", f"repeats line {seen[key]}", "warning"))
        seen.setdefault(key, line)
        if budget is not None:
            found += [
                ("truncated", f"{n} tokens over max_length {budget.max_length}", "warning")
                for i, n in budget.over
                if i == index
            ]
        findings += [LintFinding(Path(path), line, *item) for item in found]
    return findings


@dataclass(frozen=True)
class Rules:
    """Who the persona must not be, for ``lint_dataset``: forbidden names, own names, wrong statements."""

    forbidden: list[str]
    self_names: list[str]
    wrong: list[list[str]]


def labelled(messages: Conversation, name: str) -> list[tuple[str, dict[str, str]]]:
    """``(field path, message)`` pairs: ``messages[0]``, ``messages[1]``, ... for ``name="messages"``."""
    return [(f"{name}[{i}]", message) for i, message in enumerate(messages)]


def lint_turns(
    turns: list[tuple[str, dict[str, str]]], language: str, rules: Rules, questions: dict[str, tuple]
) -> list[tuple]:
    """(check, message, severity) for each problem in one conversation's turns.

    Args:
        turns: ``(field path, message)`` in conversation order (see ``labelled``).
        language: the persona's language.
        rules: forbidden identities, own names, wrong statements.
        questions: the evaluation prompts training must not hold (``evaluation_prompts``).
    """
    found = []
    asked = None
    for where, message in turns:
        text = message["content"]
        if message["role"] == "user":
            asked = checks.detect_language(text, min_words=1) or asked
            found += rubric_question(text, where, questions)
        if message["role"] != "assistant":
            continue
        if leaked := checks.leaked_tokens(text):
            found.append(("template-tokens", f"{where}: {', '.join(leaked)}", "error"))
        if claims := checks.identity_claims(text, rules.forbidden, rules.self_names):
            found.append(("identity", f"{where}: claims to be {', '.join(claims)}: {_quote(text)}", "error"))
        elif stated := [h for h in checks.stated_groups(text, rules.wrong) if h is not None]:
            found.append(("identity", f"{where}: states {', '.join(map(repr, stated))}: {_quote(text)}", "error"))
        detected = checks.detect_language(text)
        if asked is not None and detected not in (None, language, asked):
            found.append(
                ("language", f"{where}: answers in {detected}, expected {language}: {_quote(text)}", "warning")
            )
    return found


def evaluation_prompts(
    rubric_prompts: Iterable[str], held_out: Iterable[str | tuple[str, str]] = ()
) -> dict[str, tuple]:
    """``{plain text: (check, what, prompt)}`` of the rubric questions and held-out prompts.

    Args:
        rubric_prompts: the rubric's questions.
        held_out: a held-out probe's prompt, or ``(what, text)`` naming another held-out text
            (``("held-out conversation turn", "Quem te treinou, afinal?")``).
    """
    questions = {plain(p): ("rubric-question", "rubric question", p) for p in rubric_prompts}
    for item in held_out:
        what, prompt = item if isinstance(item, tuple) else ("held-out probe", item)
        questions[plain(prompt)] = ("held-out", what, prompt)
    return questions


def rubric_question(text: str, where: str, questions: dict[str, tuple]) -> list[tuple]:
    """A ``rubric-question`` or ``held-out`` error when ``text`` is one of ``questions`` or nearly."""
    text_plain = plain(text)
    for normalized, (check, what, prompt) in questions.items():
        ratio = difflib.SequenceMatcher(None, text_plain, normalized).ratio()
        if ratio >= NEAR_VERBATIM:
            how = "verbatim" if ratio == 1 else f"nearly verbatim ({ratio:.0%} similar)"
            return [(check, f"{where}: {what} {prompt!r} {how}: {_quote(text)}", "error")]
    return []


def plain(text: str) -> str:
    """Normalized text without punctuation, for comparing questions."""
    return " ".join(re.findall(r"\w+", checks.normalize(text)))


def _quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def lint_persona(
    persona: Persona, budget: BudgetReport | None = None, pair_budget: BudgetReport | None = None
) -> list[LintFinding]:
    """``lint_dataset`` on a persona's ``dataset.jsonl`` and ``lint_preferences`` on its
    ``preferences.jsonl``, with its language, identities and rubric questions.

    Args:
        persona: a loaded persona.
        budget: ``token_budget`` of the dataset (truncated examples become warnings).
        pair_budget: ``preference_budget`` of the pairs (likewise).

    Returns:
        The dataset's findings, then the preferences'; none for a file that is not there.
    """
    from molting.eval.conversations import load_conversations
    from molting.eval.probes import load_probes
    from molting.eval.rubric import load_rubric
    from molting.persona import DATASET_FILE, PREFERENCES_FILE
    from molting.preferences import lint_preferences

    if persona.root is None:
        return []
    dataset, preferences = persona.root / DATASET_FILE, persona.root / PREFERENCES_FILE
    if not dataset.is_file() and not preferences.is_file():
        return []
    rubric = load_rubric(persona)
    identity = (persona.forbidden_identities, persona.names, [q.prompt for q in rubric.questions])
    probes = load_probes(persona)
    held_out: list[str | tuple[str, str]] = [probe.prompt for probe in probes.probes] if probes else []
    if scripts := load_conversations(persona):
        held_out += [("held-out conversation turn", turn) for turn in scripts.user_turns()]
    findings = []
    if dataset.is_file():
        findings += lint_dataset(dataset, persona.language, *identity, budget, rubric.wrong, held_out)
    if preferences.is_file():
        findings += lint_preferences(preferences, persona.language, *identity, rubric.wrong, pair_budget, held_out)
    return findings


def raise_on_lint_errors(findings: list[LintFinding]) -> None:
    """Raise if any finding is an error; warnings pass.

    Raises:
        DatasetError: naming the file and every error, one per line.
    """
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        listed = "\n".join(str(f) for f in errors)
        raise DatasetError(errors[0].path, None, f"{len(errors)} lint error(s); fix them before training:\n{listed}")
