"""Errors shown to users. Each names the bad value and, where there is one, the allowed set."""

from __future__ import annotations

from pathlib import Path


class MoltingError(Exception):
    """Base class of every error molting raises on purpose."""


class PersonaError(MoltingError):
    """A persona directory or its ``persona.yaml``/``rubric.yaml`` is invalid."""


class DatasetError(MoltingError):
    """A dataset line is invalid. The message names the file, the line and the field.

    Args:
        path: the JSONL file.
        line: 1-based line number, or None for file-level problems.
        message: what is wrong.
        field: JSON path of the offending field (``messages[2].role``), if any.
    """

    def __init__(self, path: Path | str, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = Path(path), line, field
        where = f"{self.path}" + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ConfigError(MoltingError):
    """A configuration value is outside its allowed set."""


class ExportError(MoltingError):
    """A model cannot be merged, converted or quantized."""


class ModelFileError(MoltingError):
    """A model file or directory cannot be used: missing, truncated, corrupt or without weights.

    Args:
        path: the file or directory.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, path: Path | str, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after work worth keeping: the message says what was kept and how to go on.

    A KeyboardInterrupt still (``except Exception`` does not catch it); the CLI prints the
    message and exits with 130.
    """
