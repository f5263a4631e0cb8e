"""Held-out persona probes: pass/fail questions that training never sees.

The rubric (``molting.eval.rubric``) scores eight questions 0-10; the probes ask more and
simpler things ("Como você se chama?", "Are you ChatGPT?", a hotel booking, a follow-up in a
conversation) and each answer passes or fails. A persona directory holds them in
``probes.yaml``::

    version: "1.0"
    probes:
      - id: name-en                   # unique
        kind: name                    # for the per-kind pass rates
        prompt: "What's your name?"
        history: [{role: user, content: ...}, {role: assistant, content: ...}]   # optional
        language: en                  # optional; default the persona's
        expect: [["Cláudio"]]         # every group must be present (alternatives within one)
        forbid: ["I am ChatGPT"]      # none may be stated (a denial right before one is not)

An answer passes when it holds every ``expect`` group, states no ``forbid`` phrase, and fails
none of the persona-wide checks (``PERSONA_CHECKS``): template tokens, a forbidden identity
claimed in any grammatical person, the rubric's persona-wide ``wrong`` statements, the wrong
language, a loop, the system prompt pasted back, mostly invented words. The thresholds of the
last three are the module's constants; each was set by reading the answers of SmolLM2-135M
runs (issue 14), not by fitting a score.

``molting validate`` refuses training data holding a probe's prompt (``molting.data``), so a
pass rate measures the persona, not recall of its dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from molting.errors import PersonaError
from molting.eval import checks
from molting.eval.rubric import LOOP_THRESHOLD, Judge, load_rubric, phrase_groups
from molting.text import load_yaml

if TYPE_CHECKING:
    from molting.backends.base import Backend, GenerationConfig, Message
    from molting.persona import Persona

PROBES_FILE = "probes.yaml"
# An answer whose 4-grams are more than this share copied from the system prompt pastes it back.
MAX_COPIED_SHARE = 0.5
# An answer with more than this share of words (1 in 20) that are no words of its language is word salad.
MAX_INVENTED_SHARE = 0.05
PERSONA_CHECKS = ("leak", "empty", "identity", "wrong", "language", "repetition", "copying", "fluency")
_KEYS = {"id", "kind", "prompt", "history", "language", "expect", "forbid"}


@dataclass(frozen=True)
class Probe:
    """One held-out question; see the module docstring for the fields."""

    id: str
    kind: str
    prompt: str
    expect: list[list[str]] = field(default_factory=list)
    forbid: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    language: str | None = None

    def messages(self, persona: Persona, system_prompt: bool = True) -> list[Message]:
        """The conversation to answer: the persona's system prompt (or none), history, prompt."""
        if system_prompt:
            return persona.messages(self.prompt, self.history)
        return [*self.history, {"role": "user", "content": self.prompt}]


@dataclass
class ProbeSet:
    """The probes of a persona (``load_probes``)."""

    version: str
    probes: list[Probe]
    path: Path | None = None


@dataclass
class ProbeOutcome:
    """One probe's answer and verdict: ``failures`` lists why it failed (empty when it passed)."""

    id: str
    kind: str
    prompt: str
    answer: str
    failures: list[str]
    finish_reason: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ProbeResult:
    """A model's answers to every probe.

    Attributes:
        label: the model's name in reports.
        system_prompt: whether the persona's system prompt was sent (False: the model's own
            default, which for molting's GGUF is the persona's prompt in its chat template).
        outcomes: one per probe, in file order.
    """

    label: str
    system_prompt: bool
    outcomes: list[ProbeOutcome]

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def pass_rate(self) -> float:
        """Share of probes passed, in [0, 1]."""
        return self.passed / len(self.outcomes) if self.outcomes else 0.0

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind: (passed, asked)}`` in first-seen order."""
        kinds: dict[str, tuple[int, int]] = {}
        for outcome in self.outcomes:
            passed, asked = kinds.get(outcome.kind, (0, 0))
            kinds[outcome.kind] = (passed + outcome.passed, asked + 1)
        return kinds

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "system_prompt": self.system_prompt,
            "passed": self.passed,
            "asked": len(self.outcomes),
            "pass_rate": round(self.pass_rate, 4),
            "outcomes": [asdict(o) for o in self.outcomes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ProbeResult:
        return cls(data["label"], data["system_prompt"], [ProbeOutcome(**o) for o in data["outcomes"]])


def load_probes(source: Persona | str | Path) -> ProbeSet | None:
    """The probes of a persona directory (or a ``probes.yaml`` path); None if it has none.

    Raises:
        PersonaError: invalid YAML, unknown keys, a missing prompt, a duplicate id, or
            malformed groups, naming the file and the probe.
    """
    path = Path(source) if isinstance(source, str | Path) else (source.root or Path(".")) / PROBES_FILE
    if path.is_dir():
        path = path / PROBES_FILE
    if not path.is_file():
        return None
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("probes"), list) or not data["probes"]:
        raise PersonaError(f"{path}: expected a mapping with a non-empty 'probes' list")
    probes = [_parse_probe(item, f"{path}: probes[{i}]") for i, item in enumerate(data["probes"])]
    seen: set[str] = set()
    for probe in probes:
        if probe.id in seen:
            raise PersonaError(f"{path}: probe id {probe.id!r} is used twice")
        seen.add(probe.id)
    return ProbeSet(str(data.get("version", "1")), probes, path)


def _parse_probe(item: object, where: str) -> Probe:
    if not isinstance(item, dict):
        raise PersonaError(f"{where}: expected a mapping, got {type(item).__name__}")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise PersonaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    for key in ("id", "kind", "prompt"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise PersonaError(f"{where}: '{key}' must be a non-empty string")
    where = f"{where} ({item['id']})"
    expect = phrase_groups(item.get("expect") or [], f"{where}.expect")
    forbid = item.get("forbid") or []
    if not isinstance(forbid, list) or not all(isinstance(p, str) and p.strip() for p in forbid):
        raise PersonaError(f"{where}.forbid: expected a list of non-empty strings")
    history = item.get("history") or []
    _check_history(history, f"{where}.history")
    language = item.get("language")
    if language is not None and language not in ("pt", "en", "es"):
        raise PersonaError(f"{where}.language: {language!r} not in ('pt', 'en', 'es')")
    return Probe(item["id"], item["kind"], item["prompt"].strip(), expect, list(forbid), list(history), language)


def _check_history(history: object, where: str) -> None:
    if not isinstance(history, list):
        raise PersonaError(f"{where}: expected a list of messages")
    for j, message in enumerate(history):
        ok = isinstance(message, dict) and set(message) == {"role", "content"}
        if not ok or message["role"] not in ("user", "assistant") or not isinstance(message["content"], str):
            raise PersonaError(f"{where}[{j}]: expected {{role: user|assistant, content: <text>}}")
        expected_role = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected_role:
            raise PersonaError(f"{where}[{j}]: turns must alternate user, assistant, ...; got {message['role']!r}")
    if len(history) % 2:
        raise PersonaError(f"{where}: must end with an assistant turn (the probe's prompt is the next user turn)")


def probe_failures(probe: Probe, answer: str, judge: Judge, finish_reason: str | None = None) -> list[str]:
    """Why ``answer`` fails ``probe`` (empty list: it passes). See the module docstring.

    Args:
        probe: the probe.
        answer: the generated text.
        judge: the persona's rubric judge (``Judge.for_persona``): forbidden identities, own
            names, persona-wide ``wrong`` groups, known words and the system prompt.
        finish_reason: unused by the checks today; kept for symmetry with the rubric.
    """
    if leaked := checks.leaked_tokens(answer):
        return [f"leak: template tokens {', '.join(leaked)}"]
    if not answer.strip():
        return ["empty: no answer"]
    failures = []
    missing = [
        " / ".join(g[:3])
        for g, hit in zip(probe.expect, checks.matched_groups(answer, probe.expect), strict=True)
        if not hit
    ]
    if missing:
        failures.append("expect: missing " + "; ".join(missing))
    if stated := [s for s in checks.stated_groups(answer, [[p] for p in probe.forbid]) if s]:
        failures.append("forbid: states " + ", ".join(repr(s) for s in stated))
    failures += _persona_failures(probe, answer, judge)
    return failures


def _persona_failures(probe: Probe, answer: str, judge: Judge) -> list[str]:
    failures = []
    if claims := checks.identity_claims(answer, judge.forbidden, judge.names):
        failures.append(f"identity: claims to be {', '.join(claims)}")
    if wrong := [w for w in checks.stated_groups(answer, judge.wrong) if w]:
        failures.append("wrong: states " + ", ".join(repr(w) for w in wrong))
    expected = probe.language or judge.language
    detected = checks.detect_language(answer)
    if detected not in (None, expected):
        failures.append(f"language: answers in {detected}, expected {expected}")
    if (ratio := checks.repetition_ratio(answer)) > LOOP_THRESHOLD:
        failures.append(f"repetition: loops ({ratio:.0%} of 4-grams repeated)")
    copied = checks.copied_share(answer, judge.system_prompt, judge.own_words)
    selves = checks.second_person_self_references(answer, [*judge.names, *judge.traits], judge.system_prompt)
    if copied > MAX_COPIED_SHARE or selves:
        how = f'calls itself "você": "{selves[0]}"' if selves else f"{copied:.0%} of 4-grams from the system prompt"
        failures.append(f"copying: pastes the system prompt ({how})")
    share, invented = checks.invented_share(answer, expected, judge.known)
    if share > MAX_INVENTED_SHARE:
        failures.append(f"fluency: {share:.0%} invented words ({', '.join(dict.fromkeys(invented[:5]))})")
    return failures


def run_probes(
    backend: Backend,
    persona: Persona,
    probes: ProbeSet,
    config: GenerationConfig | None = None,
    *,
    label: str = "model",
    system_prompt: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ProbeResult:
    """Ask ``backend`` every probe (one greedy answer each by default) and judge the answers.

    Args:
        backend: any Backend.
        persona: the persona (system prompt, language, identities, rubric for the judge).
        probes: ``load_probes(persona)``.
        config: decoding; default ``GenerationConfig()`` (greedy, 200 new tokens, repetition
            penalty 1.1), as the rubric.
        label: the model's name in reports.
        system_prompt: send the persona's system prompt (True), or none and let the model's
            chat template supply its default (False: a molting GGUF carries the persona's).
        progress: called with the number of probes answered so far.
    """
    from molting.backends.base import GenerationConfig

    config = config or GenerationConfig()
    judge = Judge.for_persona(persona, load_rubric(persona))
    conversations = [probe.messages(persona, system_prompt) for probe in probes.probes]
    responses = backend.generate_batch(conversations, config, progress=progress)
    outcomes = [
        ProbeOutcome(
            probe.id,
            probe.kind,
            probe.prompt,
            response.text,
            probe_failures(probe, response.text, judge, response.finish_reason),
            response.finish_reason,
        )
        for probe, response in zip(probes.probes, responses, strict=True)
    ]
    return ProbeResult(label, system_prompt, outcomes)


def rejudge(result: ProbeResult, persona: Persona, probes: ProbeSet) -> ProbeResult:
    """``result``'s saved answers judged again by today's checks and ``probes`` (matched by id).

    Raises:
        PersonaError: an answered probe id is no longer in ``probes``.
    """
    judge = Judge.for_persona(persona, load_rubric(persona))
    by_id = {p.id: p for p in probes.probes}
    outcomes = []
    for old in result.outcomes:
        if old.id not in by_id:
            raise PersonaError(f"{probes.path}: no probe {old.id!r} (answered in {result.label})")
        failures = probe_failures(by_id[old.id], old.answer, judge, old.finish_reason)
        outcomes.append(ProbeOutcome(old.id, old.kind, old.prompt, old.answer, failures, old.finish_reason))
    return ProbeResult(result.label, result.system_prompt, outcomes)


def probes_table(results: list[ProbeResult]) -> str:
    """Markdown: pass rate per kind and in all, one column per result."""
    if not results:
        return ""
    header = ["kind", *(_column(r) for r in results)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(results)]
    for kind in results[0].by_kind():
        cells = []
        for result in results:
            passed, asked = result.by_kind().get(kind, (0, 0))
            cells.append(f"{passed}/{asked}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    total = [f"**{r.passed}/{len(r.outcomes)} ({r.pass_rate:.0%})**" for r in results]
    lines.append("| **all** | " + " | ".join(total) + " |")
    return "\n".join(lines)


def _column(result: ProbeResult) -> str:
    return result.label if result.system_prompt else f"{result.label} (no system prompt)"


def failures_section(result: ProbeResult, max_chars: int = 300) -> str:
    """Markdown list of the failed probes of ``result``: prompt, why, and the answer."""
    lines = []
    for outcome in result.outcomes:
        if outcome.passed:
            continue
        answer = outcome.answer if len(outcome.answer) <= max_chars else outcome.answer[:max_chars] + "…"
        answer = answer.replace("\n", " ")
        lines.append(f"- **{outcome.id}** ({outcome.prompt}): {'; '.join(outcome.failures)}. Answer: “{answer}”")
    return "\n".join(lines)
