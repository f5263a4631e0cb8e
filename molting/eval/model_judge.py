"""An optional second opinion: a language model scores answers against the rubric.

Any ``Backend`` can judge (a larger GGUF, a model directory). It is asked with one fixed
prompt, ``JUDGE_PROMPT``, greedy and short, and its score is shown beside the
deterministic one (``molting eval --judge MODEL``): it never replaces it. A judge model
is itself a model with failures; the deterministic score is the one calibrated against
hand labels (``molting.eval.calibration``) and the one ``compare`` uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from molting.backends.base import GenerationConfig

if TYPE_CHECKING:
    from molting.backends.base import Backend
    from molting.eval.rubric import Question, Rubric, RubricResult
    from molting.persona import Persona

# The fixed judging prompt. {placeholders} are filled from the persona, the rubric question
# and the answer; the rules restate the research log's Rubric v1.0.
JUDGE_PROMPT = """You grade one answer of a chat persona, 0 to 10, in the spirit of this rubric.

Persona: {name}. Facts about it:
{identity}
It must never claim to be: {forbidden}.

Question asked: {question}
Facts a good answer gives (alternatives separated by /):
{facts}
Statements that are false for this persona:
{wrong}

Answer to grade, between the markers:
<<<
{answer}
>>>

Rules: 10 = complete, correct, fluent {language}, in the persona's own voice (first person).
Each false statement, invented name or invented word costs points. The persona claiming
another identity, or describing itself in the second person as its instructions do, scores
at most 2. Chat-template tokens in the answer score 0. An answer about something else than
the question scores at most 3.
Reply with exactly one line: SCORE: <integer 0-10> - <one short reason>"""

LANGUAGE_NAMES = {"pt": "Portuguese", "en": "English", "es": "Spanish"}
SCORE_RE = re.compile(r"SCORE:\s*(\d+(?:[.,]\d+)?)", re.IGNORECASE)
# The judge's decoding: greedy, enough room for one line.
JUDGE_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Opinion:
    """A model judge's verdict on one answer.

    Attributes:
        question_id: the rubric question.
        score: 0-10, or None when the reply holds no ``SCORE: n`` line (or n is over 10).
        reply: the judge's reply, verbatim.
    """

    question_id: str
    score: float | None
    reply: str


def judge_prompt(persona: Persona, question: Question, answer: str) -> str:
    """``JUDGE_PROMPT`` filled for one answer."""

    def listed(groups: list[list[str]]) -> str:
        return "\n".join(f"- {' / '.join(g)}" for g in groups) or "- (none)"

    return JUDGE_PROMPT.format(
        name=persona.name,
        identity="\n".join(f"- {fact}" for fact in persona.identity),
        forbidden=", ".join(persona.forbidden_identities) or "(none)",
        question=question.prompt,
        facts=listed(question.facts),
        wrong=listed(question.wrong),
        answer=answer,
        language=LANGUAGE_NAMES[question.language or persona.language],
    )


def parse_score(reply: str) -> float | None:
    """The n of the first ``SCORE: n`` in ``reply``; None if there is none or it is over 10."""
    match = SCORE_RE.search(reply)
    if match is None:
        return None
    score = float(match.group(1).replace(",", "."))
    return score if 0 <= score <= 10 else None


def model_opinions(backend: Backend, persona: Persona, rubric: Rubric, result: RubricResult) -> list[Opinion]:
    """Ask ``backend`` to grade every answer of ``result``, one fresh conversation each.

    Args:
        backend: the judge model; greedy decoding, ``JUDGE_MAX_NEW_TOKENS`` new tokens.
        persona: whose answers these are.
        rubric: the rubric ``result`` was scored on; its persona-wide ``wrong`` groups are
            shown to the judge with each question's own.
        result: the deterministic scores, whose answers are judged again.

    Returns:
        One Opinion per question, on its greedy answer (the one ``Persona.chat`` gives),
        in ``result``'s order.
    """
    config = GenerationConfig(max_new_tokens=JUDGE_MAX_NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
    questions = {q.id: q for q in rubric.questions}
    opinions = []
    for scored in (q.greedy for q in result.questions):
        question = questions[scored.id]
        question = replace(question, wrong=[*question.wrong, *rubric.wrong])
        prompt = judge_prompt(persona, question, scored.answer)
        reply = backend.generate([{"role": "user", "content": prompt}], config).text
        opinions.append(Opinion(scored.id, parse_score(reply), reply))
    return opinions
