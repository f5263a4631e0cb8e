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
import platform
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from molting.errors import ConfigError
from molting.io import atomic_path

if TYPE_CHECKING:
    from molting.eval.rubric import RubricResult
    from molting.persona import Persona

ENTRY_FILE = "entry.json"
RESULTS_DIR = "results"
SCORES_PNG = "scores.png"
KINDS = ("run", "train", "eval")
PACKAGES = ("molting", "torch", "transformers", "peft", "trl", "bitsandbytes", "llama-cpp-python", "gguf")


@dataclass
class Entry:
    """One registered command.

    Attributes:
        id: the directory name under the registry root.
        kind: "run", "train" or "eval" (KINDS).
        created: UTC time, ISO 8601.
        persona: the persona's name; ``persona_dir`` its directory as given.
        hashes: ``dataset_sha256`` (of the parsed examples, so a BOM/CRLF copy hashes
            the same), ``persona_sha256`` and ``rubric_sha256`` (of the files' bytes; None when absent).
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
        from molting.eval.rubric import RubricResult

        label = label or self.primary
        found = [r for r in self.results if r["label"] == label]
        if not found:
            what = f"results {self.labels}" if self.results else "no rubric results (a `molting train` entry?)"
            raise ConfigError(f"run {self.id!r} has {what}; asked for {label!r}")
        data = json.loads((self.root / found[0]["file"]).read_text(encoding="utf-8"))
        return RubricResult.from_dict(data)

    def settings(self) -> dict:
        """Flat ``{"train.r": 16, "generation.max_new_tokens": 200, "dataset_sha256": "…", ...}``."""
        flat = {"kind": self.kind, **{k: (v[:12] if v else v) for k, v in self.hashes.items()}}
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
) -> Entry:
    """Write a new entry under ``root`` and return it.

    Args:
        root: the registry directory (``runs``); created if missing.
        persona: the persona the command ran on (hashed: dataset, persona.yaml, rubric.yaml).
        kind: one of KINDS.
        config: the command's settings as a JSON-ready nested dict.
        results: rubric results to keep, in column order.
        primary: the label ``compare`` uses by default; default the first result's.
        artifacts: name -> path of files the command wrote elsewhere.
        loss: training loss per step.

    Raises:
        ConfigError: ``kind`` not in KINDS, or ``primary`` not among the results' labels.
    """
    if kind not in KINDS:
        raise ConfigError(f"registry kind {kind!r} not in {KINDS}")
    labels = [r.label for r in results]
    primary = primary or (labels[0] if labels else None)
    if primary is not None and primary not in labels:
        raise ConfigError(f"primary result {primary!r} not among {labels}")
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
            for result, file in zip(results, files, strict=True):
                (tmp / file).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
            if results:
                from molting.plots import scores_chart

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
    from dataclasses import replace

    from molting.eval.report import compare_runs, retention_table

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
    """SHA-256 of the parsed dataset and of ``persona.yaml`` and ``rubric.yaml`` (None when a file is absent)."""
    from molting.persona import PERSONA_FILE, RUBRIC_FILE

    canonical = json.dumps(persona.examples, ensure_ascii=False, sort_keys=True).encode("utf-8")
    hashes = {"dataset_sha256": hashlib.sha256(canonical).hexdigest()}
    for key, name in (("persona_sha256", PERSONA_FILE), ("rubric_sha256", RUBRIC_FILE)):
        path = persona.root / name if persona.root else None
        hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return hashes


def package_versions() -> dict:
    """Python and the installed versions of PACKAGES (None for a package not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def config_dict(**parts: object) -> dict:
    """Nested JSON-ready settings from dataclasses and plain values (``config_dict(train=TrainConfig())``)."""
    return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in parts.items() if v is not None}


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
