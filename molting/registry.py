"""The run registry: each ``molting run``, ``train`` and ``eval`` leaves a record under ``runs/<id>/``.

::

    runs/<id>/
      entry.json             # kind, time, persona, hashes, config, versions, artifacts, loss
      results/01-base.json   # one RubricResult per model: every answer, its score and reasons
      scores.png             # per-question chart of the results, when there are any

``<id>`` is ``<UTC time>-<persona slug>-<kind>`` (``20261126-131502-claudio-eval``): ids
sort by time. The record is small; the heavy artifacts (adapter, GGUF) stay where the
command wrote them and are named under ``artifacts``. ``molting compare`` reads entries by
id or by path (``molting.eval.report.compare_runs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from molting.errors import ConfigError
from molting.eval.report import compare_runs, retention_table
from molting.eval.results import RubricResult
from molting.io import atomic_path
from molting.names import CONVERSATIONS_FILE, LABELLED_FILE, PERSONA_FILES
from molting.persona import Persona
from molting.plots import scores_chart
from molting.versions import PACKAGES, package_versions  # noqa: F401 (kept importable from here)

ENTRY_FILE = "entry.json"
RESULTS_DIR = "results"
SCORES_PNG = "scores.png"
KINDS = ("run", "train", "eval")
# The persona's files by the key of their hash in ``Entry.hashes`` (``persona_hashes``).
HASHED_FILES = {
    "persona_sha256": PERSONA_FILES[0],
    "dataset_sha256": PERSONA_FILES[1],
    "preferences_sha256": PERSONA_FILES[2],
    "rubric_sha256": PERSONA_FILES[3],
    "probes_sha256": PERSONA_FILES[4],
    "probes_test_sha256": PERSONA_FILES[5],
    "labelled_sha256": LABELLED_FILE,
    "conversations_sha256": CONVERSATIONS_FILE,
}


@dataclass
class Entry:
    """One registered command.

    Attributes:
        id: the directory name under the registry root.
        kind: "run", "train" or "eval" (KINDS).
        created: UTC time, ISO 8601.
        persona: the persona's name; ``persona_dir`` its directory as given.
        hashes: one SHA-256 per file of the persona directory (``HASHED_FILES``): ``dataset_sha256``
            of the parsed examples (so a BOM/CRLF copy hashes the same), the others of the files'
            bytes; None for a file that is absent. Entries written before preferences.jsonl,
            probes.yaml and labelled.jsonl were hashed lack those keys.
        config: the command's settings, nested (``train``, ``generation``, ``sampling``, ``models``;
            an ``eval`` entry's ``train`` is the training config of its first model, when a
            ``run.json`` lies beside it).
        versions: Python and package versions.
        results: ``[{"label", "file"}]``, in column order; files are relative to the entry.
        primary: the label ``molting compare`` uses by default (the fine-tuned model of a run,
            the first model of an eval); None when there are no results.
        artifacts: name -> path of what the command wrote elsewhere (adapter, GGUF, report).
        loss: training loss per logged step (``train`` and ``run``).
        root: the entry's directory (not saved).
    """

    id: str
    kind: str
    created: str
    persona: str
    persona_dir: str
    hashes: dict
    config: dict
    versions: dict
    results: list[dict] = field(default_factory=list)
    primary: str | None = None
    artifacts: dict = field(default_factory=dict)
    loss: list[dict] = field(default_factory=list)
    root: Path | None = None

    @property
    def labels(self) -> list[str]:
        """The labels of the entry's results, in column order."""
        return [r["label"] for r in self.results]

    def result(self, label: str | None = None) -> RubricResult:
        """The RubricResult saved under ``label`` (default ``primary``).

        Raises:
            ConfigError: the entry has no results, or none under ``label`` (the message lists them).
        """
        label = label or self.primary
        found = [r for r in self.results if r["label"] == label]
        if not found:
            what = f"results {self.labels}" if self.results else "no rubric results (a `molting train` entry?)"
            raise ConfigError(f"run {self.id!r} has {what}; asked for {label!r}")
        data = json.loads((self.root / found[0]["file"]).read_text(encoding="utf-8"))
        return RubricResult.from_dict(data)

    def settings(self) -> dict:
        """Flat ``{"train.r": 16, "generation.max_new_tokens": 200, "file dataset.jsonl": "…", ...}``.

        The persona's files appear by name (``file probes.yaml``) with the first 12 hex digits of
        their hash, so that ``molting compare`` names the file that differs between two runs.
        """
        hashes = {f"file {HASHED_FILES.get(k, k)}": (v[:12] if v else v) for k, v in self.hashes.items()}
        flat = {"kind": self.kind, **hashes}
        flat.update(_flatten(self.config))
        return flat

    def to_dict(self) -> dict:
        """JSON-ready dict (``root`` left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "root"}


def record(
    root: str | Path,
    persona: Persona,
    kind: str,
    config: dict,
    results: Sequence[RubricResult] = (),
    *,
    primary: str | None = None,
    artifacts: dict | None = None,
    loss: list[dict] | None = None,
    opinions: Sequence[dict] | None = None,
) -> Entry:
    """Write a new entry under ``root`` and return it.

    Args:
        root: the registry directory (``runs``); created if missing.
        persona: the persona the command ran on (every file of its directory hashed: ``persona_hashes``).
        kind: one of KINDS.
        config: the command's settings as a JSON-ready nested dict.
        results: rubric results to keep, in column order.
        primary: the label ``compare`` uses by default; default the first result's.
        artifacts: name -> path of files the command wrote elsewhere.
        loss: training loss per step.
        opinions: a judge model's second opinion per result (``{"model", "opinions"}``, in the
            results' order), saved in each result's file under ``judge``.

    Raises:
        ConfigError: ``kind`` not in KINDS, ``primary`` not among the results' labels, or
            ``opinions`` not one per result.
    """
    if kind not in KINDS:
        raise ConfigError(f"registry kind {kind!r} not in {KINDS}")
    labels = [r.label for r in results]
    primary = primary or (labels[0] if labels else None)
    if primary is not None and primary not in labels:
        raise ConfigError(f"primary result {primary!r} not among {labels}")
    if opinions is not None and len(opinions) != len(results):
        raise ConfigError(f"{len(opinions)} judge opinions for {len(results)} results: give one per result")
    root = Path(root)
    now = datetime.now(timezone.utc)
    files = [f"{RESULTS_DIR}/{i:02d}-{_slug(label)}.json" for i, label in enumerate(labels, start=1)]
    entry = Entry(
        id="",
        kind=kind,
        created=now.isoformat(timespec="seconds"),
        persona=persona.name,
        persona_dir=str(persona.root),
        hashes=persona_hashes(persona),
        config=config,
        versions=package_versions(),
        results=[{"label": label, "file": file} for label, file in zip(labels, files, strict=True)],
        primary=primary,
        artifacts={k: str(v) for k, v in (artifacts or {}).items()},
        loss=loss or [],
    )
    entry.id = entry_id = _reserve_id(root, f"{now:%Y%m%d-%H%M%S}-{persona.slug}-{kind}")
    try:
        with atomic_path(root / entry_id, directory=True) as tmp:
            (tmp / RESULTS_DIR).mkdir()
            for i, (result, file) in enumerate(zip(results, files, strict=True)):
                saved = result.to_dict() | ({"judge": opinions[i]} if opinions else {})
                (tmp / file).write_text(json.dumps(saved, indent=2, ensure_ascii=False), encoding="utf-8")
            if results:
                scores_chart(results, tmp / SCORES_PNG)
            (tmp / ENTRY_FILE).write_text(json.dumps(entry.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    except BaseException:
        with contextlib.suppress(OSError):
            (root / entry_id).rmdir()  # the reservation, still empty
        raise
    entry.root = root / entry_id
    return entry


def load(ref: str | Path, root: str | Path = "runs") -> Entry:
    """The entry ``ref``: an id under ``root``, or the path of an entry directory.

    Raises:
        ConfigError: no entry there; the message lists the ids under ``root``.
    """
    candidates = [Path(ref), Path(root) / str(ref)]
    for directory in candidates:
        path = directory / ENTRY_FILE
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {f.name for f in fields(Entry)} - {"root"}
            return Entry(**{k: v for k, v in data.items() if k in known}, root=directory)
    known = ", ".join(e.name for e in list_ids(root)[-10:]) or "none"
    raise ConfigError(
        f"no registered run {str(ref)!r} (looked for {candidates[0]}/{ENTRY_FILE} and under {root}/); "
        f"latest ids: {known}"
    )


def comparison(refs: Sequence[str | Path], root: str | Path = "runs", model: str | None = None) -> str:
    """``molting compare``: registered runs side by side, as markdown.

    Several refs: ``compare_runs`` over one result of each (``model``, default the run's
    primary), columns named by run id, with the settings that differ. A ref
    ``<id>:<label>`` picks the result ``label`` of that run (``runs/x:GGUF Q4_K_M``), so
    that models of one run can be set against other runs. One run with several models
    (a ``molting run``, an ``eval`` of several targets): its models side by side with
    retention against the first (``retention_table``).

    Raises:
        ConfigError: a run is not registered, or lacks the result asked for.
        ValueError: the runs' rubrics differ, or one run holds a single result.
    """
    picked = [_split_ref(ref, root) for ref in refs]
    if len(picked) == 1 and picked[0][1] is None:
        entry = picked[0][0]
        if len(entry.results) < 2:
            raise ValueError(f"run {entry.id!r} holds {len(entry.results)} result(s): give two runs or more")
        return retention_table([entry.result(label) for label in entry.labels]) + "\n"
    results = [
        replace(entry.result(label or model), label=entry.id + (f":{label}" if label else ""))
        for entry, label in picked
    ]
    return compare_runs(results, [entry.settings() for entry, _ in picked])


def _split_ref(ref: str | Path, root: str | Path) -> tuple[Entry, str | None]:
    """``(entry, label)`` for ``<id or path>`` (label None) or ``<id or path>:<label>``."""
    text = str(ref)
    if ":" in text and not (Path(root) / text / ENTRY_FILE).is_file() and not (Path(text) / ENTRY_FILE).is_file():
        ref, label = text.split(":", 1)
        return load(ref, root), label
    return load(text, root), None


def list_ids(root: str | Path = "runs") -> list[Path]:
    """Entry directories under ``root``, oldest first."""
    root = Path(root)
    return sorted(p.parent for p in root.glob(f"*/{ENTRY_FILE}")) if root.is_dir() else []


def persona_hashes(persona: Persona) -> dict:
    """SHA-256 of every file that makes the persona (``HASHED_FILES``; None when a file is absent).

    The dataset is hashed as parsed (its examples as canonical JSON), so that a copy saved with a
    byte-order mark or CRLF line ends hashes the same; the other files as bytes.
    """
    canonical = json.dumps(persona.examples, ensure_ascii=False, sort_keys=True).encode("utf-8")
    hashes = {}
    for key, name in HASHED_FILES.items():
        path = persona.root / name if persona.root else None
        if key == "dataset_sha256":
            hashes[key] = hashlib.sha256(canonical).hexdigest()
        else:
            hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return hashes


def config_dict(**parts: object) -> dict:
    """Nested JSON-ready settings from dataclasses and plain values (``config_dict(train=TrainConfig())``)."""
    return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in parts.items() if v is not None}


def training_settings(record) -> dict:
    """What a training run adds to its entry's settings, from its ``molting.train.RunRecord``:
    ``base`` (source, Hub repo, revision asked, commit trained on) and ``world_size``, so that
    ``molting compare`` shows a change of base revision or of process count."""
    base = {key: record.base.get(key) for key in ("source", "repo", "revision", "commit")}
    return {"base": base, "world_size": record.world_size}


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _reserve_id(root: Path, base: str) -> str:
    """Reserve a free id under ``root``: ``base``, else ``base-2``, ``base-3``, ...

    The id's directory is made with an exclusive ``mkdir``, which only one process can win,
    so two commands that record at the same second get two ids; ``atomic_path`` then
    replaces the empty directory with the complete entry.

    Raises:
        ConfigError: ``root`` cannot be made or written (names it and why).
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{root}: the run registry cannot be made ({exc.strerror})") from None
    n = 1
    while True:
        candidate = base if n == 1 else f"{base}-{n}"
        try:
            (root / candidate).mkdir()
        except FileExistsError:
            n += 1
            continue
        except OSError as exc:
            raise ConfigError(f"{root}: the run registry is not writable ({exc.strerror})") from None
        return candidate


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "model"
