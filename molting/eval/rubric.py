"""The rubric: questions, deterministic scoring of generated answers, and the evaluation loop.

A persona's ``rubric.yaml``::

    version: "1.0"
    known_entities: ["JavaScript", ...]   # names an answer may use beyond persona + dataset
    wrong:                                # persona-wide: false whatever the question
      - ["João é uma IA", "João é uma inteligência artificial"]
    questions:
      - id: joao
        prompt: "Quem é o João?"
        language: pt                      # optional; default: the persona's language
        facts:                            # each entry: alternatives, any one counts
          - ["João Figueiredo", "Figueiredo"]
        wrong:                            # each entry: statements false for this persona
          - ["meu filho", "meu pai"]

Scoring, 0-10 per question (``Judge.score``), from the checks of ``molting.eval.checks``:

=======================  ==========================================================
template tokens leaked   automatic 0
expected facts           up to 6, in proportion to the ``facts`` groups present
identity kept            1 (no claim of a forbidden identity, in any grammatical person)
language                 1 (the expected language, or too short to tell)
not cut mid-sentence     1
not looping              1 (at most 20% repeated word 4-grams)
                         (these four form points are earned at 3/4 by an answer with no
                         fact, in full with all its facts)
wrong statements         -3 per ``wrong`` group present (the question's and the persona-wide
                         ones; a statement denied just before, "não é meu filho", is not one)
unknown entities         -1 each, at most -3 (names nowhere in persona, dataset, rubric)
invented words           -60 x their share of the words (5% invented costs 3)
English mid-answer       -20 x the share of English words in an answer of another language
prompt copying           -6 x the share of word 4-grams copied from the system prompt
second-person self-ref.  -2 ("você é o Cláudio", "você ajuda a pensar", "seu parceiro")
identity collapse        caps the question at 2
persona-wide wrong       caps the question at 3 (an identity rule broken)
wrong language           caps the question at 4 (issue 25)
clauses said again       -2 each, at most -6 ("No código, no código.")
a name as its own role   -3 ("o João que decide o produto do João")
clauses with no fact     -4 x the share of the words in clauses with no fact or name of the persona
person and AI at once    caps the question at 3 ("Sou uma pessoa de verdade, ... a IA")
facts echoed             a fact group matched only by the question's own words does not
                         count, unless the answer states another fact
=======================  ==========================================================

Content carries the score: an answer in the right language with no fact at all and nothing
else wrong gets 0 (its form points, halved, are less than what its fact-less words cost), and
one false statement ("o João é meu filho", the negative example the log saw learned
backwards) costs as much as half the facts. The form scaling and the weights of the rows from
"invented words" down were set against ``examples/claudio/labelled.jsonl`` (99 answers
labelled by hand, see docs/rubric.md): Spearman 0.78 and a mean gap of +0.46 points there. The
thresholds of ``tests/test_calibration.py`` hold on answers labelled after that tuning.

The research log judged runs by these questions, by hand; molting judges by rules so
that two runs are compared by the same judge (``molting.eval.report.compare``).

``evaluate`` asks each question ``Sampling.n`` times (greedy, then seeded samples) and
keeps every scored answer: a question's result is the mean of its scores, and their
spread says how much of a difference between two models is noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from molting.backends.base import Backend, GenerationConfig
from molting.errors import ConfigError, PersonaError
from molting.eval import checks
from molting.eval.results import MAX_SCORE, QuestionResult, QuestionScore, RubricResult
from molting.names import LANGUAGES, RUBRIC_FILE
from molting.text import load_yaml

if TYPE_CHECKING:
    from molting.persona import Persona

__all__ = [  # the result types live in molting.eval.results; kept importable from here
    "MAX_SCORE",
    "Judge",
    "Question",
    "QuestionResult",
    "QuestionScore",
    "Rubric",
    "RubricResult",
    "Sampling",
    "default_rubric",
    "evaluate",
    "load_rubric",
    "phrase_groups",
    "rescore",
]

FACT_POINTS = 6.0
IDENTITY_POINTS = 1.0
WRONG_PENALTY = 3.0
UNKNOWN_ENTITY_PENALTY = 1.0
MAX_UNKNOWN_PENALTY = 3.0
COLLAPSE_CAP = 2.0
# Form points (identity, language, an ending, no loop) are earned in full by an answer with all its
# facts and at this fraction by one with none: form without content is not an answer. 0.5 since
# 2026-12-06 (0.75 before), tuned with FILLER_PENALTY on the 99 labelled answers (see below).
FORM_FLOOR = 0.5
LOOP_THRESHOLD = 0.2
# Fluency: points lost per unit share of invented words. Fluent answers have none; 5% invented
# (one word in 20) costs 3 points, and an answer a sixth invented cannot score at all.
FLUENCY_PENALTY = 60.0
# Code-switching: points lost per unit share of English words in an answer of another language.
FOREIGN_PENALTY = 20.0
# Prompt copying: points lost per unit share of word 4-grams copied from the system prompt (and
# not from the persona's own dataset answers); a second-person self-reference costs a flat amount.
COPY_PENALTY = 6.0
SECOND_PERSON_PENALTY = 2.0
# A persona-wide wrong statement (an identity rule broken: "o João é uma IA") caps the answer here;
# the research log scored such answers 2-3 (phase 8: "João é meu filho" 2 and 3).
IDENTITY_RULE_CAP = 3.0
# Issue 25, set by reading the answers the issue quotes (none of them in labelled.jsonl's held-out part):
# an answer in the wrong language is capped here (an English answer about art kept 6.8 of 10);
WRONG_LANGUAGE_CAP = 4.0
# a clause said again costs this much each, up to 3 clauses ("No código, no código. No CRM, no CRM.");
REPEATED_CLAUSE_PENALTY = 2.0
# a name said twice in one clause, the fact restated as its own role ("o João que decide o produto do
# João"), costs this much once;
DOUBLED_ENTITY_PENALTY = 3.0
# the share of the words in clauses that hold no fact of the persona costs this much times that share
# (half the words fact-less costs half of it). Set 2026-12-06 on the 99 labelled answers (the 48 fresh
# ones the scorer failed included) over filler 0-8 x form floor 0.5/0.75: 4 and 0.5 give rho 0.780 and
# gap +0.46, within 0.006 of the best rho (0.786 at 2, gap +0.69) with the smallest gap there.
# An LM's fluency (the base SmolLM2's per-token NLL of the answer) did not track what readers
# penalized (Spearman -0.02 with label minus score), and a check of pronoun-verb agreement ("eu
# participa") lowered rho on the same answers: neither is used.
FILLER_PENALTY = 4.0
# claiming to be a person and an AI in one answer caps it as an identity rule broken.
CONTRADICTION_CAP = IDENTITY_RULE_CAP


@dataclass(frozen=True)
class Weights:
    """The scorer's tunable weights (the module constants are the defaults).

    ``molting.eval.calibration.tune_weights`` searches them against labelled answers;
    ``cross_validate`` reports how such a tuning does on answers it was not tuned on.
    """

    form_floor: float = FORM_FLOOR
    fluency_penalty: float = FLUENCY_PENALTY
    foreign_penalty: float = FOREIGN_PENALTY
    copy_penalty: float = COPY_PENALTY
    second_person_penalty: float = SECOND_PERSON_PENALTY
    repeated_clause_penalty: float = REPEATED_CLAUSE_PENALTY
    doubled_entity_penalty: float = DOUBLED_ENTITY_PENALTY
    filler_penalty: float = FILLER_PENALTY
    wrong_language_cap: float = WRONG_LANGUAGE_CAP


@dataclass(frozen=True)
class Question:
    """One rubric question; ``facts`` and ``wrong`` are lists of alternative-phrase groups."""

    id: str
    prompt: str
    facts: list[list[str]] = field(default_factory=list)
    wrong: list[list[str]] = field(default_factory=list)
    language: str | None = None


@dataclass(frozen=True)
class Rubric:
    """A versioned list of questions, entity names answers may use, and persona-wide wrong statements.

    ``wrong`` groups are false whatever the question (the partner described as the AI,
    the persona claiming the partner's role); they are checked on every answer, beside
    each question's own ``wrong`` groups.
    """

    version: str
    questions: list[Question]
    known_entities: list[str] = field(default_factory=list)
    wrong: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """How many times ``evaluate`` asks each question, and how the extra answers are drawn.

    The first answer decodes with the evaluation's GenerationConfig as given (greedy, the
    research log's setting); answers 2..n sample at ``temperature`` and ``top_p`` with seeds
    ``seed + 1`` .. ``seed + n - 1``, so that a rerun draws the same answers. The spread of
    the n scores tells a real change from noise (``molting.eval.report.compare``).

    The default, greedy plus 2 samples, is what ``molting run`` and ``molting eval`` use: on
    2 CPU cores one pass over the 8 questions of Rubric v1.0 (200 new tokens) took 42-75 s
    per model with SmolLM2-135M in transformers, so ``molting run``'s three models cost about
    5-8 minutes more than greedy alone; two samples are the fewest that give a spread beside
    the greedy answer.

    Attributes:
        n: answers per question, >= 1 (1: greedy only, spread 0).
        temperature: sampling temperature of answers 2..n, > 0.
        top_p: nucleus mass of answers 2..n, in (0, 1].
        seed: answer k (1-based after the greedy one) uses ``seed + k``.
    """

    n: int = 3
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"samples n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ConfigError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")

    def configs(self, config: GenerationConfig) -> list[GenerationConfig]:
        """The n decoding configs: ``config`` itself, then the seeded samples."""
        samples = [
            replace(config, temperature=self.temperature, top_p=self.top_p, seed=self.seed + k)
            for k in range(1, self.n)
        ]
        return [config, *samples]


def load_rubric(source: Persona | str | Path) -> Rubric:
    """The rubric of a persona, or of a ``rubric.yaml`` file or directory holding one.

    A persona without ``rubric.yaml`` gets ``default_rubric``.

    Raises:
        PersonaError: the file is missing (when given explicitly) or invalid; the message
            names the file and the field (``questions[2].facts[0]``).
    """
    if not isinstance(source, str | Path):  # a Persona
        path = source.root / RUBRIC_FILE if source.root else None
        if path is None or not path.is_file():
            return default_rubric(source)
    else:
        path = Path(source)
        path = path / RUBRIC_FILE if path.is_dir() else path
        if not path.is_file():
            raise PersonaError(f"{path}: not found")
    data = load_yaml(path)
    return _parse_rubric(data, path)


def default_rubric(persona: Persona) -> Rubric:
    """Two identity questions in the persona's language, each expecting the persona's name."""
    prompts = {
        "pt": ("Quem é você?", "Me fala sobre você"),
        "es": ("¿Quién eres?", "Háblame de ti"),
        "en": ("Who are you?", "Tell me about yourself"),
    }[persona.language]
    names = [persona.names]
    return Rubric(
        "default",
        [Question("quem", prompts[0], facts=names), Question("sobre", prompts[1], facts=names)],
    )


def _parse_rubric(data: object, path: Path) -> Rubric:
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) or not data["questions"]:
        raise PersonaError(f"{path}: expected a mapping with a non-empty 'questions' list")
    allowed = ["known_entities", "questions", "version", "wrong"]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PersonaError(f"{path}: unknown key(s) {unknown}; allowed: {allowed}")
    questions, seen = [], set()
    for i, item in enumerate(data["questions"]):
        question = _parse_question(item, f"{path}: questions[{i}]")
        if question.id in seen:
            raise PersonaError(f"{path}: questions[{i}].id {question.id!r} is repeated")
        seen.add(question.id)
        questions.append(question)
    known = data.get("known_entities", [])
    if not isinstance(known, list) or not all(isinstance(k, str) for k in known):
        raise PersonaError(f"{path}: 'known_entities' must be a list of strings")
    wrong = phrase_groups(data.get("wrong") or [], f"{path}: wrong")
    return Rubric(str(data.get("version", "unversioned")), questions, known, wrong)


def _parse_question(item: object, where: str) -> Question:
    if not isinstance(item, dict):
        raise PersonaError(f"{where}: expected a mapping with id and prompt")
    unknown = sorted(set(item) - {"id", "prompt", "facts", "wrong", "language"})
    if unknown:
        raise PersonaError(f"{where}: unknown key(s) {unknown}; allowed: facts, id, language, prompt, wrong")
    for key in ("id", "prompt"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise PersonaError(f"{where}.{key}: missing or not a non-empty string")
    if item.get("language") not in (None, *LANGUAGES):
        raise PersonaError(f"{where}.language: {item['language']!r} not in {LANGUAGES}")
    groups = {key: phrase_groups(item.get(key) or [], f"{where}.{key}") for key in ("facts", "wrong")}
    return Question(str(item["id"]), item["prompt"], groups["facts"], groups["wrong"], item.get("language"))


def phrase_groups(value: object, where: str) -> list[list[str]]:
    """A YAML list of phrase groups (each a list of alternatives, or one string) as lists.

    Raises:
        PersonaError: not a list, or a group that is empty or holds a non-string, naming ``where``.
    """
    if not isinstance(value, list):
        raise PersonaError(f"{where}: expected a list of phrase lists")
    groups = []
    for j, group in enumerate(value):
        group = [group] if isinstance(group, str) else group
        if not isinstance(group, list) or not group or not all(isinstance(p, str) and p.strip() for p in group):
            raise PersonaError(f"{where}[{j}]: expected a non-empty list of non-empty strings")
        groups.append(group)
    return groups


@dataclass
class Judge:
    """Scores answers for one persona and rubric; see the module docstring for the points.

    Attributes:
        language: the persona's answer language (ISO 639-1).
        forbidden: identities the persona must never claim.
        known: normalized names and words an answer may use (persona, dataset, rubric).
        names: the persona's own names, for third- and second-person identity checks.
        traits: the persona's traits ("você é curioso", said by the persona, is its prompt read back).
        wrong: the rubric's persona-wide ``wrong`` groups, checked on every question.
        system_prompt: the text whose copying costs points (both of the persona's prompts).
        own_words: the persona's dataset answers: phrases found there are not copying.
        weights: the tunable weights (``Weights``; the module constants by default).
    """

    language: str
    forbidden: list[str]
    known: set[str]
    names: list[str] = field(default_factory=list)
    traits: list[str] = field(default_factory=list)
    wrong: list[list[str]] = field(default_factory=list)
    system_prompt: str = ""
    own_words: list[str] = field(default_factory=list)
    weights: Weights = field(default_factory=Weights)
    # every question's fact phrases, the persona's names and traits: a clause with none says no fact
    fact_phrases: list[str] = field(default_factory=list)

    @classmethod
    def for_persona(cls, persona: Persona, rubric: Rubric) -> Judge:
        """A judge whose known names come from the persona, its dataset and the rubric."""
        texts = [
            *persona.names,
            *persona.identity,
            *persona.traits,
            persona.system_prompt,
            persona.train_system_prompt,
            *rubric.known_entities,
        ]
        texts += [m["content"] for conversation in persona.examples for m in conversation]
        for question in rubric.questions:
            texts += [question.prompt, *(p for group in question.facts for p in group)]
        own = [m["content"] for c in persona.examples for m in c if m["role"] == "assistant"]
        return cls(
            persona.language,
            list(persona.forbidden_identities),
            checks.vocabulary(texts),
            names=persona.names,
            traits=persona.traits,
            wrong=rubric.wrong,
            system_prompt=f"{persona.system_prompt}\n{persona.train_system_prompt}",
            own_words=own + list(persona.identity),
            fact_phrases=[*persona.names, *persona.traits, *(p for q in rubric.questions for g in q.facts for p in g)],
        )

    def score(self, question: Question, answer: str, finish_reason: str | None = None) -> QuestionScore:
        """Score ``answer`` to ``question``.

        Args:
            question: the rubric question.
            answer: the generated text, as the backend returned it.
            finish_reason: "length" if generation hit ``max_new_tokens``, else "stop" or None.
        """
        result = _Tally()
        leaked = checks.leaked_tokens(answer)
        result.check("leak", not leaked, f"template tokens leaked: {', '.join(leaked)} (automatic 0)")
        if not answer.strip():
            result.check("empty", False, "empty answer")
        if leaked or not answer.strip():
            return result.finish(question, answer, finish_reason, cap=0.0)

        # A fact the answer holds only as the question's own words is an echo, not a fact (issue 25).
        hits = checks.counted_facts(question.prompt, question.facts, answer)
        found = sum(h is not None for h in hits)
        share = found / len(hits) if hits else 1.0
        result.points += FACT_POINTS * share
        # Form (identity, language, an ending, no loop) is worth its points in an answer that answers.
        floor = self.weights.form_floor
        result.form = floor + (1 - floor) * share
        missing = [" / ".join(g[:3]) for g, h in zip(question.facts, hits, strict=True) if h is None]
        result.check("facts", not missing, f"missing facts ({found}/{len(hits)}): " + "; ".join(missing))

        claims = checks.identity_claims(answer, self.forbidden, self.names)
        result.check("identity", not claims, f"identity collapse: claims to be {', '.join(claims)}", IDENTITY_POINTS)
        wrong = self._wrong(question, answer, result)
        expected = question.language or self.language
        self._form(answer, expected, finish_reason, result)
        self._invented(answer, expected, wrong, result)
        self._fluency(answer, expected, wrong, result)
        self._copying(answer, result)
        self._content(answer, expected, result)
        if claims:
            result.cap = min(result.cap, COLLAPSE_CAP)
        return result.finish(question, answer, finish_reason)

    def _wrong(self, question: Question, answer: str, result: _Tally) -> list[str]:
        """The question's and the persona-wide ``wrong`` groups: -WRONG_PENALTY per group present.

        A persona-wide group is an identity rule (who the persona and its partner are): a
        hit also caps the answer at ``IDENTITY_RULE_CAP``. Returns the phrases found, whose
        words are then not counted again as unknown entities.
        """
        own = question.wrong
        shared = [g for g in self.wrong if g not in own]
        groups = [*own, *shared]
        # ... also through a sentence that opens on a bare copula ("O Molting é ... . É uma startup").
        hits = [h or next(iter(checks.elided_statements(answer, g)), None)
                for g, h in zip(groups, checks.stated_groups(answer, groups), strict=True)]
        present = [h for h in hits if h is not None]
        result.points -= WRONG_PENALTY * len(present)
        quoted = ", ".join(f'"{w}"' for w in present)
        result.check("wrong", not present, f"wrong: {quoted} (-{WRONG_PENALTY:g} each)")
        if any(h is not None for h in hits[len(own) :]):
            result.cap = min(result.cap, IDENTITY_RULE_CAP)
        return present

    @staticmethod
    def _form(answer: str, expected: str, finish_reason: str | None, result: _Tally) -> None:
        """Language, truncation and loops: a point each."""
        detected = checks.detect_language(answer)
        result.check("language", detected in (None, expected), f"answers in {detected}, expected {expected}", 1.0)
        truncated = checks.is_truncated(answer, finish_reason)
        result.check("truncated", not truncated, "cut mid-sentence at max_new_tokens", 1.0)
        ratio = checks.repetition_ratio(answer)
        result.check("repetition", ratio <= LOOP_THRESHOLD, f"loops: {ratio:.0%} of 4-grams repeated", 1.0)

    def _invented(self, answer: str, language: str, wrong: list[str], result: _Tally) -> None:
        """Unknown names: -1 each, at most -3; a wrong statement's own words are not counted again."""
        wrong_words = {checks.normalize(w) for phrase in wrong for w in phrase.split()}
        unknown = [e for e in checks.unknown_entities(answer, self.known) if checks.normalize(e) not in wrong_words]
        result.points -= min(MAX_UNKNOWN_PENALTY, UNKNOWN_ENTITY_PENALTY * len(unknown))
        result.check("entities", not unknown, "unknown entities (hallucinated?): " + ", ".join(unknown))

    def _fluency(self, answer: str, language: str, wrong: list[str], result: _Tally) -> None:
        """Invented words and English mid-answer: points lost in proportion to their share of the words.

        Invented words cost ``FLUENCY_PENALTY`` per unit share. English words in an answer of another language cost
        ``FOREIGN_PENALTY`` per unit share (an answer wholly in English fails ``language``).
        """
        share, invented = checks.invented_share(answer, language, self.known)
        cost = self.weights.fluency_penalty * share
        result.points -= cost
        shown = ", ".join(dict.fromkeys(invented[:6]))
        result.check("fluency", not invented, f"invented words ({share:.0%}): {shown} (-{cost:.1f})")

        wrong_words = {checks.normalize(w) for phrase in wrong for w in phrase.split()}
        foreign = checks.foreign_words(answer, language, self.known | wrong_words)
        mixed = bool(foreign) and checks.detect_language(answer) in (None, language)
        share = len(foreign) / len(checks.words_of(answer)) if mixed else 0.0
        cost = self.weights.foreign_penalty * share
        result.points -= cost
        shown = ", ".join(dict.fromkeys(foreign[:6]))
        result.check("mixed", not mixed, f"English mid-answer ({share:.0%}): {shown} (-{cost:.1f})")

    def _copying(self, answer: str, result: _Tally) -> None:
        """The system prompt read back: copied n-grams (points scale with the share) and "você é o Cláudio"."""
        share = checks.copied_share(answer, self.system_prompt, self.own_words)
        result.points -= self.weights.copy_penalty * share
        cost = f"-{self.weights.copy_penalty * share:.1f}"
        result.check("copying", share == 0, f"{share:.0%} of 4-grams copied from the system prompt ({cost})")
        selves = checks.second_person_self_references(answer, [*self.names, *self.traits], self.system_prompt)
        penalty = self.weights.second_person_penalty
        if selves:
            result.points -= penalty
        quoted = selves[0] if selves else ""
        result.check("second-person", not selves, f'calls itself "você": "{quoted}" (-{penalty:g})')

    def _content(self, answer: str, expected: str, result: _Tally) -> None:
        """Known words that say little (issue 25): the wrong language caps the answer; clauses said
        again, a name restated as its own role and clauses with no fact cost points; claiming to
        be a person and an AI caps it."""
        weights = self.weights
        if other := checks.wrong_language(answer, expected):
            result.cap = min(result.cap, weights.wrong_language_cap)
            result.reasons.append(f"in {other}, not {expected} (capped at {weights.wrong_language_cap:g})")
        # A loop (the ``repetition`` check) already costs its point and form; its clauses are not counted again.
        repeats = checks.repeated_clauses(answer) if checks.repetition_ratio(answer) <= LOOP_THRESHOLD else []
        result.points -= weights.repeated_clause_penalty * min(3, len(repeats))
        shown = "; ".join(f'"{r}"' for r in repeats[:3])
        result.check("repeats", not repeats, f"clauses said again: {shown} (-{weights.repeated_clause_penalty:g} each)")
        doubled = checks.doubled_entities(answer, [*self.names, *self.forbidden])
        if doubled:
            result.points -= weights.doubled_entity_penalty
        cost = weights.doubled_entity_penalty
        result.check("muddled", not doubled, f"{', '.join(doubled)} twice in one clause (-{cost:g})")
        if self.fact_phrases:
            share, empty = checks.factless_share(answer, self.fact_phrases)
            result.points -= weights.filler_penalty * share
            quoted = "; ".join(f'"{c}"' for c in empty[:2])
            cost = f"-{weights.filler_penalty * share:.1f}"
            result.check("filler", share == 0.0, f"{share:.0%} of the words in clauses with no fact: {quoted} ({cost})")
        contradicts = checks.self_contradiction(answer)
        if contradicts:
            result.cap = min(result.cap, CONTRADICTION_CAP)
        capped = f"capped at {CONTRADICTION_CAP:g}"
        result.check("contradiction", not contradicts, f"claims to be a person and an AI ({capped})")


@dataclass
class _Tally:
    points: float = 0.0
    cap: float = MAX_SCORE
    form: float = 1.0
    reasons: list[str] = field(default_factory=list)
    passed: dict[str, bool] = field(default_factory=dict)

    def check(self, name: str, ok: bool, reason: str, points: float = 0.0) -> None:
        """Record a check; ``points`` are earned if it passed, ``reason`` kept if it failed."""
        self.passed[name] = ok
        if ok:
            self.points += points * self.form
        else:
            self.reasons.append(reason)

    def finish(self, question: Question, answer: str, finish_reason: str | None, cap: float = MAX_SCORE):
        """The QuestionScore: points clipped to [0, min(cap, self.cap)], one decimal."""
        score = round(min(cap, self.cap, max(0.0, self.points)), 1)
        return QuestionScore(question.id, question.prompt, answer, score, self.reasons, self.passed, finish_reason)


def rescore(result: RubricResult, persona: Persona, rubric: Rubric) -> RubricResult:
    """``result``'s saved answers scored again by today's judge (``Judge.for_persona``), its probes kept.

    For comparing runs scored before a rubric change: the answers stay, the points follow the rules.

    Raises:
        PersonaError: an answered question id is not in ``rubric``.
    """
    judge = Judge.for_persona(persona, rubric)
    by_id = {q.id: q for q in rubric.questions}
    questions = []
    for old in result.questions:
        if old.id not in by_id:
            raise PersonaError(f"rubric {rubric.version}: no question {old.id!r} (answered in {result.label})")
        answers = [judge.score(by_id[old.id], a.answer, a.finish_reason) for a in old.answers]
        questions.append(QuestionResult(old.id, old.prompt, answers))
    return RubricResult(result.label, rubric.version, questions, result.sampling, result.probes, result.drift)


def evaluate(
    backend: Backend,
    persona: Persona,
    rubric: Rubric,
    config: GenerationConfig | None = None,
    *,
    label: str = "model",
    sampling: Sampling | None = None,
    progress: Callable[[int], None] | None = None,
) -> RubricResult:
    """Ask ``backend`` every rubric question as ``persona``, ``sampling.n`` times, and score each answer.

    Each answer is a fresh conversation: the persona's inference system prompt, then the
    question. The questions are asked together through ``backend.generate_batch``, once
    per decoding (the greedy answer, then each seeded sample). Use the same ``config`` and
    ``sampling`` for every model you compare.

    Args:
        backend: any Backend (transformers, llama.cpp, or a test double).
        persona: supplies the system prompt, the language and the forbidden identities.
        rubric: the questions (``load_rubric``).
        config: decoding of the first answer; default ``GenerationConfig()`` (greedy, 200 new
            tokens, repetition_penalty 1.1). The samples take everything else from it.
        label: the name of this model in reports.
        sampling: answers per question; default one greedy answer (``Sampling(n=1)``).
        progress: called with the number of answers generated so far, of
            ``len(rubric.questions) * sampling.n``.
    """
    config = config or GenerationConfig()
    sampling = sampling or Sampling(n=1)
    judge = Judge.for_persona(persona, rubric)
    conversations = [persona.messages(question.prompt) for question in rubric.questions]
    answers: list[list[QuestionScore]] = [[] for _ in rubric.questions]
    for k, decoding in enumerate(sampling.configs(config)):
        done = k * len(conversations)
        step = (lambda n, done=done: progress(done + n)) if progress is not None else None
        responses = backend.generate_batch(conversations, decoding, progress=step)
        for question, scores, response in zip(rubric.questions, answers, responses, strict=True):
            scores.append(judge.score(question, response.text, response.finish_reason))
    questions = [QuestionResult(q.id, q.prompt, scores) for q, scores in zip(rubric.questions, answers, strict=True)]
    return RubricResult(label, rubric.version, questions, asdict(sampling))
