"""Outputs: a directory is replaced without a moment where the old one is deleted and the new one absent,
and ``check_output_file`` refuses what a command must not overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from molting.errors import ConfigError
from molting.io import atomic_path, check_output_file, check_writable_dir


def test_a_failed_directory_replacement_keeps_the_old_directory(tmp_path, monkeypatch):
    import molting.io as io

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    real_rename = io.os.rename

    def failing_rename(src, dst):
        """The new directory's rename fails once the old one has been moved aside."""
        if ".partial-" in Path(src).name and not Path(dst).exists():
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", failing_rename)
    with pytest.raises(OSError), atomic_path(target, directory=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old-only").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_check_output_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "old.gguf").write_bytes(b"GGUF....")
    (tmp_path / "notes.txt").write_text("mine")
    cases = {
        model / "model.safetensors": "inside the input directory",
        model: "is one of the command's inputs",
        tmp_path / "notes.txt": "not a GGUF file",
        tmp_path / "old.gguf": "pass --force",
        tmp_path: "is a directory",
        tmp_path / "notes.txt" / "x.gguf": "is not a directory",
    }
    for out, problem in cases.items():
        with pytest.raises(ConfigError, match=problem):
            check_output_file(out, [model], magic=b"GGUF")
    check_output_file(tmp_path / "old.gguf", [model], force=True, magic=b"GGUF")
    check_output_file(tmp_path / "new" / "deeper" / "x.gguf", [model], magic=b"GGUF")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_check_writable_dir_names_the_file_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"runs: --runs cannot be made: .*afile is not a directory"):
        check_writable_dir(tmp_path / "afile" / "runs", "--runs")
    check_writable_dir(tmp_path / "fresh" / "runs", "--runs")
    assert not (tmp_path / "fresh").exists()
