"""A persona directory, read and validated once.

Every file that makes a persona is parsed here, one time, and the steps after take what was
loaded (``molting run`` parses ``rubric.yaml`` and ``probes.yaml`` once each)::

    persona.yaml       # molting.persona: who the persona is (unknown keys rejected)
    dataset.jsonl      # molting.data: the training conversations
    preferences.jsonl  # molting.preferences: optional DPO pairs
    rubric.yaml        # molting.eval.rubric: the scored questions (default_rubric without it)
    probes.yaml        # molting.eval.probes: optional held-out pass/fail probes, the dev split
    probes-test.yaml   # molting.eval.probes: optional test split, the headline (issue 25)
    labelled.jsonl     # molting.eval.calibration: optional hand-labelled answers for the scorer
    conversations.yaml # molting.eval.conversations: optional held-out conversations (drift, issue 23)

The loader sits above both the data formats and ``molting.eval``: it is the one module that
knows all eight files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from molting.eval.calibration import Labelled, load_labelled
from molting.eval.conversations import ScriptSet, load_conversations
from molting.eval.probes import ProbeSet, load_probe_splits
from molting.eval.rubric import Rubric, load_rubric
from molting.names import LABELLED_FILE, PERSONA_FILES  # noqa: F401 (kept importable from here)
from molting.persona import Persona


@dataclass
class PersonaDir:
    """Everything a persona directory holds, parsed and checked.

    Attributes:
        persona: persona.yaml with its dataset and preference pairs (``Persona.load``).
        rubric: rubric.yaml, or ``default_rubric(persona)`` without one.
        probes: probes.yaml, the dev split; None without one.
        labelled: labelled.jsonl (``molting.eval.calibration``); None without one.
        test_probes: probes-test.yaml, the test split (the headline); None without one.
        conversations: conversations.yaml, the held-out conversations; None without one.
    """

    persona: Persona
    rubric: Rubric
    probes: ProbeSet | None = None
    labelled: list[Labelled] | None = None
    test_probes: ProbeSet | None = None
    conversations: ScriptSet | None = None

    @property
    def probe_splits(self) -> list[ProbeSet]:
        """The probe splits the directory has, the test split first (``load_probe_splits``' order)."""
        return [s for s in (self.test_probes, self.probes) if s is not None]

    @classmethod
    def load(cls, path: str | Path) -> PersonaDir:
        """Read and validate every file of the persona directory ``path``.

        Raises:
            PersonaError: persona.yaml, rubric.yaml, probes.yaml, probes-test.yaml or conversations.yaml missing a
                key, holding an unknown one, or invalid (the message names the file and the
                field); a test probe that is also a dev probe.
            DatasetError: an invalid line of dataset.jsonl, preferences.jsonl or labelled.jsonl
                (naming the file, the line and the field).
        """
        return cls.around(Persona.load(path))

    @classmethod
    def around(cls, persona: Persona) -> PersonaDir:
        """The rest of the directory of an already loaded ``persona``: rubric, probes, labelled
        answers, conversations."""
        labelled = persona.root / LABELLED_FILE if persona.root is not None else None
        splits = {s.split: s for s in load_probe_splits(persona)}
        return cls(
            persona,
            load_rubric(persona),
            splits.get("dev"),
            load_labelled(labelled) if labelled is not None and labelled.is_file() else None,
            splits.get("test"),
            load_conversations(persona),
        )


def persona_dir(source: Persona | PersonaDir) -> PersonaDir:
    """``source`` itself, or the directory around a loaded Persona (its other files read now)."""
    return source if isinstance(source, PersonaDir) else PersonaDir.around(source)
