"""Dataset lint: what a model should not learn, read before any training step.

:func:`lint_dataset` reads the answers for what the research log and issue 12 saw models learn
from bad data: template tokens, forbidden identities, the wrong language, duplicates, rubric
questions in the training data, and truncated examples. :func:`lint_preferences` reads the
chosen answers of the DPO pairs the same way, and :func:`lint_persona` runs both over a
loaded persona directory.

The lint needs the rubric's questions and the held-out probes' prompts, so it lives above
both the data formats (``molting.data``, ``molting.preferences``) and ``molting.eval``;
neither of those knows of it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from molting.data import BudgetReport, Conversation, numbered_examples
from molting.errors import DatasetError
from molting.eval import checks
from molting.persona import DATASET_FILE, PREFERENCES_FILE, Persona
from molting.persona_dir import PersonaDir, persona_dir
from molting.preferences import Preference, load_preferences

# A training prompt this similar to a rubric question (difflib ratio of the normalized texts)
# is "nearly verbatim": the rubric would measure recall of the dataset, not the persona.
NEAR_VERBATIM = 0.85


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
    examples: list[tuple[int, Conversation]] | None = None,
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
        examples: ``(line, conversation)`` pairs already read from ``path`` (a loaded persona's);
            None reads them (``numbered_examples``).

    Returns:
        Findings in line order.

    Raises:
        DatasetError: the file cannot be read (see ``load_dataset``).
    """
    examples = examples if examples is not None else numbered_examples(path)
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


def raise_on_lint_errors(findings: list[LintFinding]) -> None:
    """Raise if any finding is an error; warnings pass.

    Raises:
        DatasetError: naming the file and every error, one per line.
    """
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        listed = "\n".join(str(f) for f in errors)
        raise DatasetError(errors[0].path, None, f"{len(errors)} lint error(s); fix them before training:\n{listed}")


def lint_preferences(
    path: str | Path,
    language: str,
    forbidden: Iterable[str] = (),
    self_names: Iterable[str] = (),
    rubric_prompts: Iterable[str] = (),
    wrong: Iterable[Iterable[str]] = (),
    budget: BudgetReport | None = None,
    held_out: Iterable[str | tuple[str, str]] = (),
    pairs: list[Preference] | None = None,
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
        pairs: the pairs already read from ``path`` (a loaded persona's); None reads them.

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
    for index, pair in enumerate(pairs if pairs is not None else load_preferences(path), start=1):
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


def lint_persona(
    persona: Persona | PersonaDir, budget: BudgetReport | None = None, pair_budget: BudgetReport | None = None
) -> list[LintFinding]:
    """``lint_dataset`` on a persona's dataset and ``lint_preferences`` on its preference pairs,
    with its language, identities, rubric questions, held-out probe prompts and conversation turns.

    Args:
        persona: a loaded persona directory (``PersonaDir.load``); a bare Persona has its
            rubric and probes read first.
        budget: ``token_budget`` of the dataset (truncated examples become warnings).
        pair_budget: ``preference_budget`` of the pairs (likewise).

    Returns:
        The dataset's findings, then the preferences'; none for a file that is not there.
    """
    loaded = persona_dir(persona)
    persona, rubric = loaded.persona, loaded.rubric
    if persona.root is None:
        return []
    dataset, preferences = persona.root / DATASET_FILE, persona.root / PREFERENCES_FILE
    if not dataset.is_file() and not preferences.is_file():
        return []
    identity = (persona.forbidden_identities, persona.names, [q.prompt for q in rubric.questions])
    # Both probe splits: the dev probes (recipes are chosen by them) and the test probes (the headline).
    held_out: list[str | tuple[str, str]] = [probe.prompt for split in loaded.probe_splits for probe in split.probes]
    if loaded.conversations:
        held_out += [("held-out conversation turn", turn) for turn in loaded.conversations.user_turns()]
    findings = []
    numbered = len(persona.lines) == len(persona.examples) > 0
    read = list(zip(persona.lines, persona.examples, strict=True)) if numbered else None
    if dataset.is_file():
        findings += lint_dataset(dataset, persona.language, *identity, budget, rubric.wrong, held_out, read)
    if preferences.is_file():
        pairs = persona.preferences or None
        findings += lint_preferences(
            preferences, persona.language, *identity, rubric.wrong, pair_budget, held_out, pairs
        )
    return findings
