"""atomic_path: the target appears whole or not at all, with ordinary permissions."""

import os

import pytest

from molting.io import atomic_path


def test_interrupted_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_success_renames_with_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.gguf") as tmp:
            tmp.write_bytes(b"x")
        with atomic_path(tmp_path / "adapter", directory=True) as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.gguf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "adapter" / "f").read_text() == "y"


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """Under the CLI, SIGTERM is an exception: the partial file goes, the old one stays."""
    import signal

    from molting.cli import exit_on_sigterm

    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        exit_on_sigterm()
        with pytest.raises(SystemExit) as exit_info, atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and target.read_bytes() == b"old"
