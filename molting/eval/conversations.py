"""Held-out conversations: does the persona still hold at turn 10 of its own conversation?

The rubric and the probes ask single questions. Persona drift grows within a dialog (Li et al.
2024, "Measuring and Controlling Instruction (In)Stability in Language Model Dialogs",
arXiv 2402.10962: significant drift within 8 rounds), so a persona directory may hold scripts
of user turns in ``conversations.yaml``; the model answers each turn with its **own** earlier
answers as the history, as a user's conversation keeps them::

    version: "1.0"
    conversations:
      - id: ferias-pt                 # unique
        language: pt                  # the language every answer should be in; default the persona's
        turns:                        # 8-20 user turns
          - "Bom dia! Acabei de voltar de férias."          # a plain turn: persona-wide checks only
          - say: "E você, quem é mesmo?"                   # a checked turn
            kind: identity            # optional: an identity turn (see "identity lost" below)
            expect: [["Cláudio", "Claudio"]]               # as the probes: every group present
            forbid: ["sou o João"]                          # none stated (a denial is not a statement)

Every answer is judged as a probe's (``molting.eval.probes.probe_failures``: the turn's
``expect``/``forbid`` and the persona-wide checks: template tokens, a forbidden identity in any
person, the rubric's ``wrong`` statements, the language, a loop, the system prompt pasted
back, invented words) and by one check only a conversation has, ``echo``: a long answer copied
from an earlier answer of the same conversation (the demo GGUF gave one reply word for word
to three different questions, issue 23). An answer that fails none *holds*.

Drift is the share of answers held at each turn index over the conversations, for the greedy
run and ``Sampling.n - 1`` sampled runs (the spread), and per conversation the turn at which
identity is first lost: the first answer that claims a forbidden identity or states a
``wrong`` statement, or fails an ``identity`` turn's groups. ``compare_drift`` calls a
regression only beyond the noise, as ``molting.eval.report.compare`` does for the rubric.

``molting validate`` refuses training data holding one of these user turns
(``molting.lint.lint_persona``), so drift measures the persona, not recall of its dataset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from molting.backends.session import fit_to_context
from molting.errors import PersonaError
from molting.eval import checks
from molting.eval.probes import Probe, probe_failures
from molting.eval.results import (
    LATE_TURN,
    NOISE_Z,
    ConversationRun,
    DriftResult,
    TurnOutcome,
)
from molting.eval.rubric import Judge, Rubric, Sampling, load_rubric, phrase_groups
from molting.names import CONVERSATIONS_FILE
from molting.text import load_yaml

if TYPE_CHECKING:
    from molting.backends.base import Backend, GenerationConfig, Message
    from molting.persona import Persona

MIN_TURNS, MAX_TURNS = 8, 20
# A change of the late share smaller than this is noise: about one answer in twenty.
THRESHOLD = 0.05
# ``echo``: an answer of at least ECHO_MIN_WORDS words with more than ECHO_SHARE of its
# 4-grams copied from one earlier answer of the conversation. A short restatement ("Sou o
# Cláudio, a IA da Softtor.") asked for twice is no echo; a paragraph given again is.
ECHO_MIN_WORDS = 12
ECHO_SHARE = 0.8
# The decoding ``molting run`` and ``molting eval`` hold the conversations with: answers of up to
# DRIFT_MAX_NEW_TOKENS tokens, the greedy run and one seeded sample (the spread). What they cost
# on SmolLM2-135M is in docs/drift.md.
DRIFT_MAX_NEW_TOKENS = 96
DRIFT_SAMPLING = Sampling(n=2)
_CONVERSATION_KEYS = {"id", "language", "turns"}
_TURN_KEYS = {"say", "kind", "expect", "forbid"}


@dataclass(frozen=True)
class Turn:
    """One user turn of a script; ``expect``/``forbid`` as a probe's, ``kind`` "identity" or free."""

    say: str
    kind: str | None = None
    expect: list[list[str]] = field(default_factory=list)
    forbid: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Script:
    """A held-out conversation: its user turns, in order, and the language of its answers."""

    id: str
    language: str | None
    turns: list[Turn]


@dataclass
class ScriptSet:
    """The held-out conversations of a persona (``load_conversations``)."""

    version: str
    scripts: list[Script]
    path: Path | None = None

    def user_turns(self) -> list[str]:
        """Every user turn of every script, for the lint (training must not hold them)."""
        return [turn.say for script in self.scripts for turn in script.turns]


def load_conversations(source: Persona | str | Path) -> ScriptSet | None:
    """The held-out conversations of a persona directory (or a ``conversations.yaml`` path); None without.

    Raises:
        PersonaError: invalid YAML, unknown keys, a script of fewer than MIN_TURNS or more than
            MAX_TURNS turns, a duplicate id, malformed groups; naming the file and the place.
    """
    path = Path(source) if isinstance(source, str | Path) else (source.root or Path(".")) / CONVERSATIONS_FILE
    if path.is_dir():
        path = path / CONVERSATIONS_FILE
    if not path.is_file():
        return None
    data = load_yaml(path)
    items = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise PersonaError(f"{path}: expected a mapping with a non-empty 'conversations' list")
    scripts = [_parse_script(item, f"{path}: conversations[{i}]") for i, item in enumerate(items)]
    ids = [s.id for s in scripts]
    if duplicate := next((i for i in ids if ids.count(i) > 1), None):
        raise PersonaError(f"{path}: conversation id {duplicate!r} is used twice")
    return ScriptSet(str(data.get("version", "1")), scripts, path)


def _parse_script(item: object, where: str) -> Script:
    if not isinstance(item, dict):
        raise PersonaError(f"{where}: expected a mapping, got {type(item).__name__}")
    if unknown := sorted(set(item) - _CONVERSATION_KEYS):
        raise PersonaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_CONVERSATION_KEYS)}")
    if not isinstance(item.get("id"), str) or not item["id"].strip():
        raise PersonaError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({item['id']})"
    language = item.get("language")
    if language is not None and language not in ("pt", "en", "es"):
        raise PersonaError(f"{where}.language: {language!r} not in ('pt', 'en', 'es')")
    turns = item.get("turns")
    if not isinstance(turns, list) or not MIN_TURNS <= len(turns) <= MAX_TURNS:
        count = len(turns) if isinstance(turns, list) else "no"
        raise PersonaError(f"{where}.turns: expected {MIN_TURNS}-{MAX_TURNS} user turns, got {count}")
    return Script(item["id"], language, [_parse_turn(t, f"{where}.turns[{j}]") for j, t in enumerate(turns)])


def _parse_turn(item: object, where: str) -> Turn:
    if isinstance(item, str) and item.strip():
        return Turn(item.strip())
    if not isinstance(item, dict):
        raise PersonaError(f"{where}: expected a string or a mapping with 'say'")
    if unknown := sorted(set(item) - _TURN_KEYS):
        raise PersonaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TURN_KEYS)}")
    if not isinstance(item.get("say"), str) or not item["say"].strip():
        raise PersonaError(f"{where}.say: must be a non-empty string")
    kind = item.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise PersonaError(f"{where}.kind: must be a string")
    forbid = item.get("forbid") or []
    if not isinstance(forbid, list) or not all(isinstance(p, str) and p.strip() for p in forbid):
        raise PersonaError(f"{where}.forbid: expected a list of non-empty strings")
    return Turn(item["say"].strip(), kind, phrase_groups(item.get("expect") or [], f"{where}.expect"), list(forbid))


def longest_conversation(tokenizer, system_prompt: str, scripts: ScriptSet, max_new_tokens: int) -> tuple[str, int]:
    """The held-out conversation whose prompt grows longest, and its tokens at the last turn.

    Every answer is taken to use all of ``max_new_tokens``: the count is the chat template over
    the system prompt, every user turn and empty answers, plus ``max_new_tokens`` per answer
    (the last turn's answer included), so it bounds what ``run_drift`` sends.

    Args:
        tokenizer: a transformers tokenizer with the model's chat template.
        system_prompt: the persona's inference system prompt.
        scripts: ``load_conversations(persona)``.
        max_new_tokens: answer length, in tokens.

    Returns:
        ``(conversation id, tokens)``.
    """
    sizes = []
    for script in scripts.scripts:
        messages = [{"role": "system", "content": system_prompt}]
        for turn in script.turns:
            messages += [{"role": "user", "content": turn.say}, {"role": "assistant", "content": ""}]
        template = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        ids = template["input_ids"] if isinstance(template, dict) else template
        sizes.append((len(ids) + len(script.turns) * max_new_tokens, script.id))
    tokens, cid = max(sizes)
    return cid, tokens


def turn_failures(turn: Turn, answer: str, earlier: list[str], judge: Judge, language: str | None) -> list[str]:
    """Why ``answer`` to ``turn`` does not hold: the probes' checks, then ``echo`` (see the module docstring).

    Args:
        turn: the user turn and its groups.
        answer: the model's answer.
        earlier: the model's earlier answers in this conversation, oldest first.
        judge: the persona's rubric judge (``Judge.for_persona``).
        language: the language the answer should be in (None: the persona's).
    """
    probe = Probe("turn", turn.kind or "turn", turn.say, turn.expect, turn.forbid, language=language)
    failures = probe_failures(probe, answer, judge)
    if len(checks.words_of(answer)) >= ECHO_MIN_WORDS:
        for index, before in enumerate(earlier, start=1):
            if (share := checks.copied_share(answer, before)) > ECHO_SHARE:
                failures.append(f"echo: {share:.0%} of 4-grams copied from its answer at turn {index}")
                break
    return failures


def run_drift(
    backend: Backend,
    persona: Persona,
    scripts: ScriptSet,
    config: GenerationConfig,
    sampling: Sampling | None = None,
    *,
    label: str = "model",
    progress: Callable[[int], None] | None = None,
    rubric: Rubric | None = None,
) -> DriftResult:
    """Hold every held-out conversation with ``backend``, greedy and sampled, and judge each answer.

    Turn k of all conversations is generated in one ``Backend.generate_batch`` call (a batching
    engine answers them together), each with the model's own earlier answers as its history,
    fitted to ``backend.n_ctx`` by ``molting.backends.session.fit_to_context``.

    Args:
        backend: any Backend.
        persona: system prompt, language, identities (and its rubric, for the judge).
        scripts: ``load_conversations(persona)``.
        config: decoding of the greedy run; its ``max_new_tokens`` bounds every answer.
        sampling: runs per conversation (``Sampling.configs``: ``config``, then seeded samples);
            default ``Sampling()``, greedy plus two samples.
        label: the model's name in reports.
        progress: called with the number of answers generated so far.
        rubric: the persona's rubric, for the judge (as loaded once by
            ``molting.persona_dir.PersonaDir``); None reads it (``load_rubric(persona)``).
    """
    start = time.perf_counter()
    sampling = sampling or Sampling()
    judge = Judge.for_persona(persona, rubric or load_rubric(persona))
    runs, done = [], 0
    for decoding in sampling.configs(config):
        run = _hold(backend, persona, scripts, decoding, judge, lambda n, start=done: progress and progress(start + n))
        done += sum(len(s.turns) for s in scripts.scripts)
        runs.append(run)
    identity = {s.id: [i for i, t in enumerate(s.turns, start=1) if t.kind == "identity"] for s in scripts.scripts}
    decodings = [{"temperature": d.temperature, "seed": d.seed} for d in sampling.configs(config)]
    return DriftResult(label, runs, decodings, identity, time.perf_counter() - start)


def _hold(backend, persona, scripts: ScriptSet, config, judge: Judge, progress) -> list[ConversationRun]:
    """One run: every script answered turn by turn, turn k of all scripts in one batch."""
    system = [{"role": "system", "content": persona.system_prompt}]
    histories: dict[str, list[Message]] = {s.id: [] for s in scripts.scripts}
    outcomes: dict[str, list[TurnOutcome]] = {s.id: [] for s in scripts.scripts}
    done = 0
    for index in range(max(len(s.turns) for s in scripts.scripts)):
        active = [s for s in scripts.scripts if index < len(s.turns)]
        prompts, dropped = [], []
        for script in active:
            message = {"role": "user", "content": script.turns[index].say}
            history = histories[script.id]
            try:
                drop = fit_to_context(backend, system, history, message, config.max_new_tokens, backend.n_ctx)
            except NotImplementedError:
                drop = 0
            prompts.append([*system, *history[drop:], message])
            dropped.append(drop)
        responses = backend.generate_batch(prompts, config)
        for script, prompt, drop, response in zip(active, prompts, dropped, responses, strict=True):
            turn, answer = script.turns[index], response.text
            earlier = [o.answer for o in outcomes[script.id]]
            failures = turn_failures(turn, answer, earlier, judge, script.language)
            outcome = TurnOutcome(index + 1, turn.say, answer, failures, response.finish_reason, drop)
            outcomes[script.id].append(outcome)
            histories[script.id] += [prompt[-1], {"role": "assistant", "content": answer}]
        done += len(active)
        if progress:
            progress(done)
    return [ConversationRun(s.id, outcomes[s.id]) for s in scripts.scripts]


@dataclass
class DriftComparison:
    """``after``'s drift judged against ``before``'s.

    Attributes:
        verdict: "regression", "improvement" or "unchanged".
        delta: change of the share held at turns >= LATE_TURN, in [-1, 1].
        band: the smallest change called one: THRESHOLD, or NOISE_Z standard errors of the
            difference (``DriftResult.share``) when larger.
        new_losses: conversations whose greedy run held its identity before and loses it now;
            any one makes the verdict a regression, as a new identity failure does for the rubric.
    """

    before: DriftResult
    after: DriftResult
    verdict: str
    delta: float
    band: float
    new_losses: list[str]

    def summary(self) -> str:
        """The verdict line."""
        (b, _), (a, _) = self.before.share(), self.after.share()
        lost = f"; identity newly lost in {', '.join(self.new_losses)}" if self.new_losses else ""
        return (
            f"**{self.verdict.upper()}** (drift): {self.after.label} holds {a:.0%} of the answers at turns >= "
            f"{LATE_TURN} vs {self.before.label} {b:.0%} ({self.delta:+.0%}; changes under ±{self.band:.0%} "
            f"are noise{lost})."
        )


def compare_drift(before: DriftResult, after: DriftResult, threshold: float = THRESHOLD) -> DriftComparison:
    """Judge ``after``'s drift against ``before``'s, beyond the noise (see DriftComparison)."""
    (b, b_se), (a, a_se) = before.share(), after.share()
    delta = round(a - b, 4)
    band = round(max(threshold, NOISE_Z * math.hypot(b_se, a_se)), 4)
    old, new = before.identity_lost(), after.identity_lost()
    new_losses = [cid for cid, turn in new.items() if turn is not None and old.get(cid, 0) is None]
    if new_losses or delta <= -band:
        verdict = "regression"
    elif delta >= band:
        verdict = "improvement"
    else:
        verdict = "unchanged"
    return DriftComparison(before, after, verdict, delta, band, new_losses)


def drift_table(results: list[DriftResult]) -> str:
    """Markdown: share held per turn (greedy; mean ± spread over runs), turns >= LATE_TURN, identity lost."""
    if not results:
        return ""
    header = "| turn | " + " | ".join(r.label for r in results) + " |"
    lines = [header, "|---:|" + "---:|" * len(results)]
    curves = [{t: (g, m, s) for t, g, m, s in r.curve()} for r in results]
    for turn in range(1, max(r.turns for r in results) + 1):
        cells = [_share_cell(*c[turn], len(r.runs)) if turn in c else "–" for c, r in zip(curves, results, strict=True)]
        lines.append(f"| {turn} | " + " | ".join(cells) + " |")
    late = [f"**{m:.0%} ± {se:.0%}**" for m, se in (r.share() for r in results)]
    lines.append(f"| **≥ {LATE_TURN}** | " + " | ".join(late) + " |")
    lost = [_lost_cell(r) for r in results]
    lines.append("| identity lost (greedy) | " + " | ".join(lost) + " |")
    return "\n".join(lines)


def _share_cell(greedy: float, mean: float, spread: float, runs: int) -> str:
    return f"{greedy:.0%} ({mean:.0%} ± {spread:.0%})" if runs > 1 else f"{greedy:.0%}"


def _lost_cell(result: DriftResult) -> str:
    lost = result.identity_lost()
    turns = sorted(t for t in lost.values() if t is not None)
    where = f", at turn {', '.join(map(str, turns))}" if turns else ""
    return f"{len(turns)}/{len(lost)} conversations{where}"


def failures_section(result: DriftResult, max_chars: int = 200) -> str:
    """Markdown list of the greedy run's failed answers: conversation, turn, user turn, why, the answer."""
    lines = []
    for conversation in result.runs[0]:
        for outcome in conversation.outcomes:
            if outcome.held:
                continue
            answer = outcome.answer if len(outcome.answer) <= max_chars else outcome.answer[:max_chars] + "…"
            lines.append(
                f"- **{conversation.id}** turn {outcome.turn} ({outcome.user}): {'; '.join(outcome.failures)}. "
                f"Answer: “{answer.replace(chr(10), ' ')}”"
            )
    return "\n".join(lines)
