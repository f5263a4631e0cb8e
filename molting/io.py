"""Write-then-rename helpers: no reader ever sees a half-written file or directory.

Also the checks that an output can be written, run before a long job so that a
read-only directory or a wrong ``--out`` is found in a second, not after an hour.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from molting.errors import ConfigError


@contextlib.contextmanager
def atomic_path(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target``; rename it onto ``target`` on success.

    On any exception (KeyboardInterrupt included) the temporary file or directory is
    removed and ``target`` is left as it was. The sibling lives in the same directory,
    so the final ``os.replace`` is atomic on POSIX file systems. An existing target
    directory is first renamed aside (never deleted before the new one is in place), and
    put back if the final rename fails; it is removed only once the new one is there.

    Args:
        target: the final path.
        directory: yield a temporary directory instead of a file path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create 0600/0700; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if directory else 0o666) & ~umask)
    try:
        yield tmp
        if directory:
            _replace_directory(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace_directory(tmp: Path, target: Path) -> None:
    """Put directory ``tmp`` at ``target``; an old ``target`` is moved aside first, removed last.

    ``rename`` replaces a missing or empty ``target`` atomically (an id the registry reserved
    with ``mkdir`` stays reserved throughout); only a non-empty one is moved aside.
    """
    try:
        os.rename(tmp, target)
        return
    except OSError as exc:
        if not target.is_dir() or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path: str | Path, what: str = "directory") -> None:
    """Check that files can be created in directory ``path`` (or where it would be made).

    A probe file is created and removed in ``path``, or in its nearest existing ancestor
    when ``path`` does not exist yet; nothing else is created. Run it before a long job
    whose result would be written there.

    Args:
        path: the directory.
        what: its role, for the message (``--runs``).

    Raises:
        ConfigError: ``path`` (or an ancestor) is a file, or the directory is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{path}: {what} cannot be made: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".molting-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{path}: {what} is not writable ({exc.strerror})") from None


def check_output_file(
    path: str | Path,
    inputs: Sequence[str | Path] = (),
    force: bool = False,
    magic: bytes | None = None,
    what: str = "--out",
) -> None:
    """Check that ``path`` may be written: not a directory, not an input, writable, asked for.

    Args:
        path: the file a command will write.
        inputs: files and directories the command reads (model weights); ``path`` may be none of
            them nor lie inside one that is a directory (an export must not overwrite its own weights).
        force: replace an existing file of the same kind.
        magic: the first bytes of a file of the kind written (``b"GGUF"``); an existing file
            that does not start with them is never replaced, even with ``force``. None: any
            existing file needs ``force``.
        what: the option's name, for the message.

    Raises:
        ConfigError: naming ``path`` and what is wrong.
    """
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source:
            raise ConfigError(f"{path}: {what} is one of the command's inputs; choose another file")
        if source.is_dir() and source in target.parents:
            raise ConfigError(f"{path}: {what} lies inside the input directory {source}; choose another place")
    if path.is_dir():
        raise ConfigError(f"{path}: {what} is a directory; give a file name")
    if path.exists():
        if magic is not None and not _starts_with(path, magic):
            raise ConfigError(f"{path}: {what} exists and is not a {magic.decode(errors='replace')} file; not replaced")
        if not force:
            raise ConfigError(f"{path}: {what} exists; pass --force to replace it")
    check_writable_dir(path.parent, f"the directory of {what}")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
