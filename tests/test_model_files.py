"""Model files that cannot be used: one line naming the file and the problem, in every command, no traceback."""

import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from molting.cli import app
from molting.errors import ModelFileError
from molting.modelfiles import check_gguf, check_model_dir

PERSONA = str(Path(__file__).resolve().parents[1] / "examples" / "claudio")


@pytest.fixture(scope="module")
def good_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    from molting.export import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.F16.gguf", outtype="f16")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bad_gguf(kind: str, good: Path, tmp: Path) -> tuple[Path, str]:
    """An unusable model file of ``kind`` and the words its error must hold."""
    data = good.read_bytes()
    if kind == "truncated":
        return _write(tmp / "cut.gguf", data[: len(data) - 1000]), f"truncated GGUF: {len(data) - 1000} bytes"
    if kind == "corrupt":  # the first key's length field garbled: it now runs past the end of the file
        bad = data[:24] + struct.pack("<Q", 2**40) + data[32:]
        return _write(tmp / "corrupt.gguf", bad), "metadata entry 1 of"
    if kind == "wrong magic":
        return _write(tmp / "magic.gguf", b"GGML" + data[4:]), "not a GGUF file: it starts with b'GGML'"
    if kind == "lfs pointer":
        pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"
        return _write(tmp / "pointer.gguf", pointer), "Git LFS pointer"
    if kind == "missing":
        return tmp / "missing.gguf", "file not found"
    raise ValueError(kind)


GGUF_PROBLEMS = ["truncated", "corrupt", "wrong magic", "lfs pointer", "missing"]


@pytest.mark.parametrize("kind", GGUF_PROBLEMS)
def test_check_gguf_names_the_problem(kind, good_gguf, tmp_path):
    path, words = _bad_gguf(kind, good_gguf, tmp_path)
    with pytest.raises(ModelFileError, match=words) as error:
        check_gguf(path)
    assert str(error.value).startswith(f"{path}: ")


def test_check_gguf_accepts_a_complete_file(good_gguf):
    info = check_gguf(good_gguf)
    assert (info.architecture, info.data_bytes) == ("llama", good_gguf.stat().st_size)
    assert info.n_tensors > 0


def _assert_one_line(result, path: Path, words: str) -> None:
    """Exit code 2, no traceback, and the error as the one line on stderr (stdout may hold progress)."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # typer.Exit(2), not an uncaught error
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0] and words in lines[0], lines[0]


@pytest.mark.parametrize("command", ["chat", "eval"])
@pytest.mark.parametrize("kind", GGUF_PROBLEMS)
def test_unusable_gguf_is_one_line_in_cli(command, kind, good_gguf, tmp_path):
    path, words = _bad_gguf(kind, good_gguf, tmp_path)
    args = [command, PERSONA, "Oi"] if command == "chat" else [command, PERSONA]
    result = CliRunner().invoke(app, [*args, "--model", str(path)])
    _assert_one_line(result, path, words)


@pytest.fixture
def dir_without_weights(tiny_llama_dir, tmp_path) -> Path:
    directory = tmp_path / "no_weights"
    shutil.copytree(tiny_llama_dir, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    return directory


@pytest.mark.parametrize(
    "args",
    [
        ["chat", PERSONA, "Oi", "--model"],
        ["eval", PERSONA, "--model"],
        ["validate", PERSONA, "--base"],
        ["train", PERSONA, "--base"],
        ["export", PERSONA, "--adapter", "unused", "--out", "x.gguf", "--base"],
    ],
    ids=lambda args: args[0],
)
def test_model_dir_without_weights_is_one_line_in_cli(args, dir_without_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*args, str(dir_without_weights)])
    _assert_one_line(result, dir_without_weights, "no model weights")


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    directory = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=r"model.safetensors: truncated safetensors"):
        check_model_dir(directory)
    check_model_dir(tiny_llama_dir)  # the complete one passes


def test_missing_model_path_in_cli(tmp_path):
    result = CliRunner().invoke(app, ["chat", PERSONA, "Oi", "--model", str(tmp_path / "nothing")])
    _assert_one_line(result, tmp_path / "nothing", "no such file or directory")
