"""A persona: who the model should be, and the conversations that teach it.

A persona directory holds::

    persona.yaml    # name, identity facts, traits, language, system prompts (unknown keys rejected)
    dataset.jsonl   # chat examples, one {"messages": [...]} object per line (TRL's format)
    preferences.jsonl  # optional: chosen/rejected answer pairs for DPO (see molting.preferences)
    rubric.yaml     # optional: the evaluation questions (see molting.eval.rubric)
    probes.yaml     # optional: held-out pass/fail probes (see molting.eval.probes)
    labelled.jsonl  # optional: hand-labelled answers for the scorer (see molting.eval.calibration)

``Persona.load`` reads the first three; ``molting.persona_dir.PersonaDir.load`` reads them all,
once, for the commands that need the rubric and the probes too.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from molting.backends import Backend, GenerationConfig, Message, load_backend
from molting.backends.session import ChatSession
from molting.data import Conversation, numbered_examples
from molting.errors import PersonaError
from molting.names import DATASET_FILE, LANGUAGES, PERSONA_FILE, PREFERENCES_FILE, RUBRIC_FILE  # noqa: F401
from molting.preferences import Preference, load_preferences
from molting.text import load_yaml

MAX_NAME = 200  # characters of a name, alias or forbidden identity: names, not documents


@dataclass
class Persona:
    """A persona and its training conversations.

    Attributes:
        name: the persona's own name ("Cláudio").
        language: ISO 639-1 code of the default answer language; one of LANGUAGES.
        identity: identity facts, one short sentence each.
        traits: personality traits ("curioso", "direto").
        train_system_prompt: the short system prompt used in training (fewer tokens
            spent per example; the research log's phase 8 measured 108 vs 339 tokens).
        system_prompt: the full system prompt used at inference and written into the GGUF.
        aliases: other spellings of ``name`` that count as the persona ("Claudio").
        forbidden_identities: who the persona must never claim to be ("João", "ChatGPT").
        root: the persona directory.
        examples: the validated conversations of ``dataset.jsonl``.
        preferences: the validated pairs of ``preferences.jsonl``; empty without the file.
        lines: the 1-based line of each example in ``dataset.jsonl`` (for the lint's messages).
    """

    name: str
    language: str
    identity: list[str]
    traits: list[str]
    train_system_prompt: str
    system_prompt: str
    aliases: list[str] = field(default_factory=list)
    forbidden_identities: list[str] = field(default_factory=list)
    root: Path | None = None
    examples: list[Conversation] = field(default_factory=list, repr=False)
    preferences: list[Preference] = field(default_factory=list, repr=False)
    lines: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Persona:
        """Load and validate a persona directory.

        Raises:
            PersonaError: missing files, unknown or missing keys, wrong types.
            DatasetError: an invalid dataset or preferences line (names the file, line and field).
        """
        root = Path(path)
        spec_path = root / PERSONA_FILE
        if not spec_path.is_file():
            raise PersonaError(f"{spec_path}: not found (a persona directory needs {PERSONA_FILE})")
        spec = load_yaml(spec_path) or {}
        persona = cls(**_check_spec(spec, spec_path), root=root)
        dataset = root / DATASET_FILE
        if dataset.exists():
            numbered = numbered_examples(dataset)
            persona.examples = [conversation for _, conversation in numbered]
            persona.lines = [line for line, _ in numbered]
        preferences = root / PREFERENCES_FILE
        if preferences.exists():
            persona.preferences = load_preferences(preferences)
        return persona

    @property
    def slug(self) -> str:
        """ASCII, lower-case name for file names ("Cláudio" -> "claudio"), at most 64 characters."""
        ascii_name = unicodedata.normalize("NFKD", self.name).encode("ascii", "ignore").decode()
        return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower())[:64].strip("-") or "persona"

    @property
    def names(self) -> list[str]:
        """The persona's name and its aliases."""
        return [self.name, *self.aliases]

    def messages(self, message: str, history: Sequence[Message] = ()) -> list[Message]:
        """The inference conversation: system prompt, ``history``, then ``message``."""
        return [
            {"role": "system", "content": self.system_prompt},
            *history,
            {"role": "user", "content": message},
        ]

    def chat(
        self,
        message: str,
        model: Backend | str | Path | None = None,
        history: Sequence[Message] = (),
        **options,
    ) -> str:
        """Answer ``message`` as this persona.

        Args:
            message: the user's turn.
            model: a Backend, a path (a ``.gguf`` file, a model directory, a run
                directory of ``molting run``), or None: this persona's latest exported
                GGUF under ``runs/<slug>/`` if there is one, else the embedded base model.
            history: earlier turns, without the system prompt.
            **options: decoding options of :class:`molting.backends.GenerationConfig`.
        """
        backend = model if isinstance(model, Backend) else load_backend(model or self.default_model())
        return backend.chat(self.messages(message, history), **options)

    def session(
        self, model: Backend | str | Path | None = None, n_ctx: int | None = None, **options
    ) -> ChatSession:
        """A multi-turn conversation with this persona that keeps its own history.

        ``session.send("Oi")`` answers and remembers; when the history outgrows the context
        window, the oldest exchanges are dropped and the system prompt is kept
        (``molting.backends.session``).

        Args:
            model: as for :meth:`chat`.
            n_ctx: the context window in tokens; default the backend's (``Backend.n_ctx``).
            **options: decoding options of :class:`molting.backends.GenerationConfig`.
        """
        backend = model if isinstance(model, Backend) else load_backend(model or self.default_model())
        return ChatSession(backend, self.system_prompt, GenerationConfig(**options), n_ctx)

    def default_model(self) -> Path | str:
        """The GGUF of this persona's last ``molting run`` in ./runs, else the embedded model."""
        found = sorted(Path("runs", self.slug).glob("*.gguf"))
        return found[-1] if found else "smollm2-135m"


def _check_spec(spec: object, path: Path) -> dict:
    if not isinstance(spec, dict):
        raise PersonaError(f"{path}: expected a mapping of keys, got {type(spec).__name__}")
    allowed = {f.name for f in fields(Persona)} - {"root", "examples", "preferences", "lines"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PersonaError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    required = ("name", "language", "identity", "traits", "train_system_prompt", "system_prompt")
    missing = [k for k in required if not spec.get(k)]
    if missing:
        raise PersonaError(f"{path}: missing or empty key(s) {missing}")
    if spec["language"] not in LANGUAGES:
        raise PersonaError(f"{path}: language {spec['language']!r} not in {LANGUAGES}")
    for key in ("name", "train_system_prompt", "system_prompt"):
        if not isinstance(spec[key], str):
            raise PersonaError(f"{path}: '{key}' must be a string")
    for key in ("identity", "traits", "aliases", "forbidden_identities"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise PersonaError(f"{path}: '{key}' must be a list of non-empty strings")
    names = [("name", spec["name"])]
    for key in ("aliases", "forbidden_identities"):
        names += [(f"{key}[{i}]", v) for i, v in enumerate(spec.get(key, []))]
    for where, value in names:
        if len(value) > MAX_NAME:
            raise PersonaError(f"{path}: '{where}' is {len(value)} characters long; a name has at most {MAX_NAME}")
    return {k: v.strip() if isinstance(v, str) else v for k, v in spec.items()}
