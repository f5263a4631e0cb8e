"""Preference pairs for DPO: a chosen answer and a rejected one to the same prompt.

``preferences.jsonl`` lies beside ``dataset.jsonl``, one JSON object per line, in TRL's
conversational preference format::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "kind": "role-swap"}

``prompt`` holds user/assistant turns (a system turn only first) and ends with a user turn;
``chosen`` and ``rejected`` hold one assistant turn each; ``kind`` (optional) names the failure
the rejected answer shows, one of ``KINDS``. The research log's phase 8 learned negative
examples ("João não é meu filho") backwards under plain SFT: a pair says "this, not that"
without putting the wrong sentence among the answers to imitate.

Validation is as strict as the dataset's (:func:`molting.data.parse_line`): every problem is a
``DatasetError`` naming the file, the line and the field. :func:`lint_preferences` reads the
chosen answers as :func:`molting.data.lint_dataset` reads the dataset's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molting.data import (
    BudgetReport,
    Conversation,
    LintFinding,
    Rules,
    check_message,
    evaluation_prompts,
    labelled,
    lint_turns,
    read_lines,
    token_budget,
    with_system_prompt,
)
from molting.errors import DatasetError

KINDS = ("identity-collapse", "role-swap", "pasted-prompt", "invented-facts", "other")
KEYS = ("prompt", "chosen", "rejected", "kind")
PROMPT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Preference:
    """One validated pair.

    Attributes:
        prompt: the conversation so far, ending with a user turn.
        chosen: the answer to prefer.
        rejected: the answer to move away from.
        kind: the failure ``rejected`` shows (one of ``KINDS``), or None.
        line: 1-based line in the file.
    """

    prompt: Conversation
    chosen: str
    rejected: str
    kind: str | None = None
    line: int = 0

    def row(self, system_prompt: str) -> dict[str, Conversation]:
        """TRL's conversational preference row, ``system_prompt`` first unless the prompt has its own."""
        return {
            "prompt": with_system_prompt(self.prompt, system_prompt),
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def load_preferences(path: str | Path) -> list[Preference]:
    """Read and validate a ``preferences.jsonl`` file.

    Blank lines are skipped; a UTF-8 byte-order mark and CRLF line ends are read as they are.

    Returns:
        The pairs in file order.

    Raises:
        DatasetError: naming the file, the 1-based line and the field, for: a missing file,
            bytes that are not UTF-8, invalid JSON, a missing or unknown key, a prompt that is
            not a list of turns ending with a user turn, a ``chosen``/``rejected`` that is not
            exactly one assistant turn, empty content, ``chosen`` equal to ``rejected``, a
            ``kind`` outside ``KINDS``, or a file without pairs.
    """
    path = Path(path)
    pairs = [parse_preference(line, path, number) for number, line in read_lines(path)]
    if not pairs:
        raise DatasetError(path, None, "no preference pairs")
    return pairs


def parse_preference(line: str, path: Path, number: int) -> Preference:
    """Parse one line of ``preferences.jsonl``. Raises DatasetError (see load_preferences)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DatasetError(path, number, f"expected an object with keys {KEYS}")
    for key in record:
        if key not in KEYS:
            raise DatasetError(path, number, f"unknown key; allowed: {KEYS}", field=key)
    prompt = _prompt(record.get("prompt"), path, number)
    chosen = _answer(record.get("chosen"), "chosen", path, number)
    rejected = _answer(record.get("rejected"), "rejected", path, number)
    if chosen.strip() == rejected.strip():
        raise DatasetError(path, number, "the same answer as 'chosen': nothing to prefer", field="rejected")
    kind = record.get("kind")
    if kind is not None and kind not in KINDS:
        raise DatasetError(path, number, f"unknown kind {kind!r}; allowed: {KINDS}", field="kind")
    return Preference(prompt, chosen, rejected, kind, number)


def _prompt(value: Any, path: Path, number: int) -> Conversation:
    if not isinstance(value, list) or not value:
        raise DatasetError(path, number, "expected a non-empty list of turns", field="prompt")
    for i, message in enumerate(value):
        check_message(message, f"prompt[{i}]", path, number, first=i == 0, roles=PROMPT_ROLES)
    if value[-1]["role"] != "user":
        last = f"prompt[{len(value) - 1}].role"
        raise DatasetError(path, number, "the prompt must end with a user turn, to be answered", field=last)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: Any, key: str, path: Path, number: int) -> str:
    if not isinstance(value, list) or len(value) != 1:
        raise DatasetError(path, number, "expected a list of exactly one assistant turn", field=key)
    check_message(value[0], f"{key}[0]", path, number, roles=("assistant",))
    return value[0]["content"]


def preference_budget(tokenizer, pairs: list[Preference], system_prompt: str, max_length: int) -> BudgetReport:
    """Count the tokens each pair takes under ``tokenizer``'s chat template, as ``token_budget`` does.

    DPO truncates a sequence over ``max_length`` without a word (TRL's ``truncation_mode``), so
    this is counted before training as the dataset is.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        pairs: validated pairs (see ``load_preferences``).
        system_prompt: prepended to prompts without their own system turn.
        max_length: the training sequence limit, in tokens.

    Returns:
        A BudgetReport whose ``lengths`` are, per pair, the longer of prompt + chosen and
        prompt + rejected, and whose ``over`` numbers pairs from 1 in file order.
    """
    answers = [[{"role": "assistant", "content": a}] for pair in pairs for a in (pair.chosen, pair.rejected)]
    prompts = [pair.prompt for pair in pairs for _ in range(2)]
    both = token_budget(tokenizer, [p + a for p, a in zip(prompts, answers, strict=True)], system_prompt, max_length)
    lengths = [max(both.lengths[i], both.lengths[i + 1]) for i in range(0, len(both.lengths), 2)]
    over = [(i, n - max_length) for i, n in enumerate(lengths, start=1) if n > max_length]
    return BudgetReport(max_length, both.system_tokens, lengths, over)


def lint_preferences(
    path: str | Path,
    language: str,
    forbidden: Iterable[str] = (),
    self_names: Iterable[str] = (),
    rubric_prompts: Iterable[str] = (),
    wrong: Iterable[Iterable[str]] = (),
    budget: BudgetReport | None = None,
    held_out: Iterable[str | tuple[str, str]] = (),
) -> list[LintFinding]:
    """Read the pairs for what DPO should not push the model towards, before training.

    The **chosen** answers (and any assistant turns of the prompt) get ``lint_dataset``'s checks:
    template tokens, a forbidden identity claimed in any person, a persona-wide ``wrong``
    statement (errors), the wrong language (warning). A user turn that is a rubric question or a
    held-out probe's prompt, verbatim or nearly, is an error, as in the dataset: the rubric and
    the probes would measure recall of the pairs. A pair repeated from an earlier line and a pair
    the token budget truncates are warnings. The rejected answers are not linted: they are meant to be wrong.

    Args:
        path: the ``preferences.jsonl`` file (read with ``load_preferences``).
        language, forbidden, self_names, rubric_prompts, wrong, held_out: as for ``lint_dataset``.
        budget: ``preference_budget`` of these pairs; its truncated pairs become warnings.

    Returns:
        Findings in line order; ``check`` names as ``lint_dataset``'s, field paths ``prompt[i]``
        and ``chosen[0]``.

    Raises:
        DatasetError: the file cannot be read (see ``load_preferences``).
    """
    questions = evaluation_prompts(rubric_prompts, held_out)
    rules = Rules(list(forbidden), list(self_names), [list(g) for g in wrong])
    findings, seen = [], {}
    over = dict(budget.over) if budget is not None else {}
    for index, pair in enumerate(load_preferences(path), start=1):
        chosen = {"role": "assistant", "content": pair.chosen}
        found = lint_turns([*labelled(pair.prompt, "prompt"), ("chosen[0]", chosen)], language, rules, questions)
        key = json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False)
        if key in seen:
            found.append(("duplicate", f"repeats line {seen[key]}", "warning"))
        seen.setdefault(key, pair.line)
        if index in over:
            found.append(("truncated", f"{over[index]} tokens over max_length {budget.max_length}", "warning"))
        findings += [LintFinding(Path(path), pair.line, *item) for item in found]
    return findings
