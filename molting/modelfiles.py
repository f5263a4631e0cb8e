"""Checks that a model file or directory can be used, before an engine reads it.

llama.cpp answers a truncated or corrupt GGUF with "Failed to load model from file" and
transformers with a traceback several screens long. These checks read only headers and
name the file and what is wrong with it, as a :class:`molting.errors.ModelFileError`.

GGUF layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): the magic
``GGUF``, a uint32 version, uint64 tensor and metadata counts, the metadata, the tensor
infos, then the tensor data, aligned to ``general.alignment`` (32 by default).
safetensors layout (https://github.com/huggingface/safetensors): a uint64 header size,
a JSON header with each tensor's byte range, then the data.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from molting.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a usable GGUF says.

    Attributes:
        version: GGUF format version (2 or 3).
        architecture: ``general.architecture`` ("llama", "phi3", ...), None if absent.
        n_tensors: number of tensors.
        data_bytes: bytes the tensor data needs, from the start of the file.
    """

    version: int
    architecture: str | None
    n_tensors: int
    data_bytes: int


def check_gguf(path: str | Path) -> GGUFInfo:
    """Check that ``path`` is a complete GGUF file by walking its header.

    The metadata and tensor infos are read with the ``gguf`` package's tables (value
    types, ``GGML_QUANT_SIZES``) and skipped, not decoded, so a 49k-token vocabulary costs
    milliseconds; tensor data is never read, only its extent compared with the file size.

    Args:
        path: the ``.gguf`` file.

    Returns:
        The header's summary.

    Raises:
        ModelFileError: missing, not a file, wrong magic (a Git LFS pointer or an HTML page
            is named as such), unsupported version, metadata or tensor infos cut short or
            holding unknown types, or tensor data cut short (the size it has and needs).
    """
    path = Path(path)
    head = _read_head(path, _GGUF_HEADER.size)
    if len(head) < _GGUF_HEADER.size:
        raise ModelFileError(path, f"truncated GGUF: {len(head)} bytes, the header alone needs {_GGUF_HEADER.size}")
    magic, version, n_tensors, n_kv = _GGUF_HEADER.unpack(head)
    if magic != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}{_looks_like(head)}")
    if version not in GGUF_VERSIONS:
        raise ModelFileError(path, f"GGUF version {version} is not supported (supported: {GGUF_VERSIONS})")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(path, buffer, _GGUF_HEADER.size)
        metadata = {key: cursor.value(key) for key in cursor.keys(n_kv)}
        tensor_end = max((cursor.tensor_info(i, n_tensors) for i in range(n_tensors)), default=0)
    alignment = metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    data_bytes = -(-cursor.pos // alignment) * alignment + tensor_end
    size = path.stat().st_size
    if data_bytes > size:
        raise ModelFileError(path, f"truncated GGUF: {size} bytes, its {n_tensors} tensors need {data_bytes}")
    return GGUFInfo(version, metadata.get("general.architecture"), n_tensors, data_bytes)


def _read_head(path: Path, n: int) -> bytes:
    if not path.exists():
        raise ModelFileError(path, "file not found")
    if not path.is_file():
        raise ModelFileError(path, "not a file")
    with path.open("rb") as f:
        return f.read(n)


def _looks_like(head: bytes) -> str:
    """A hint at what a file with the wrong magic is, from its first bytes."""
    if head.startswith(b"version https://git-lfs"):
        return " (a Git LFS pointer: fetch the file with `git lfs pull`)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return " (an HTML page: the download failed)"
    return ""


class _Cursor:
    """Reads a GGUF header from ``buffer`` at ``pos``; every overrun is a ModelFileError naming where."""

    _KEPT = ("general.architecture", "general.alignment")  # values decoded; the rest are skipped

    def __init__(self, path: Path, buffer, pos: int):
        self.path, self.buffer, self.pos = path, buffer, pos
        self.where = "the header"

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes; return the old position."""
        if n < 0 or self.pos + n > len(self.buffer):
            raise ModelFileError(
                self.path, f"truncated or corrupt GGUF: {len(self.buffer)} bytes, {self.where} runs past the end"
            )
        self.pos += n
        return self.pos - n

    def scalar(self, kind: gguf.GGUFValueType):
        fmt = _SCALARS[kind]
        return fmt.unpack_from(self.buffer, self.take(fmt.size))[0]

    def string(self) -> bytes:
        n = self.scalar(gguf.GGUFValueType.UINT64)
        start = self.take(n)
        return self.buffer[start : start + n]

    def value_type(self) -> gguf.GGUFValueType:
        raw = self.scalar(gguf.GGUFValueType.UINT32)
        try:
            return gguf.GGUFValueType(raw)
        except ValueError:
            raise ModelFileError(self.path, f"corrupt GGUF: {self.where} has unknown value type {raw}") from None

    def keys(self, n_kv: int):
        """Yield the ``n_kv`` metadata keys, leaving the cursor at each one's value."""
        for i in range(n_kv):
            self.where = f"metadata entry {i + 1} of {n_kv}"
            key = self.string().decode("utf-8", errors="replace")
            self.where = f"metadata key {key!r}"
            yield key

    def value(self, key: str):
        """Read the value at the cursor; decoded for the keys in ``_KEPT``, else skipped (None)."""
        kind = self.value_type()
        if kind == gguf.GGUFValueType.STRING:
            text = self.string()
            return text.decode("utf-8", errors="replace") if key in self._KEPT else None
        if kind == gguf.GGUFValueType.ARRAY:
            item, count = self.value_type(), self.scalar(gguf.GGUFValueType.UINT64)
            if item in _SCALARS:
                self.take(count * _SCALARS[item].size)
            else:
                for _ in range(count):
                    self._skip(item)
            return None
        return self.scalar(kind)

    def _skip(self, kind: gguf.GGUFValueType) -> None:
        if kind == gguf.GGUFValueType.STRING:
            self.string()
        elif kind == gguf.GGUFValueType.ARRAY:
            self.value("")
        else:
            self.take(_SCALARS[kind].size)

    def tensor_info(self, i: int, n_tensors: int) -> int:
        """Read tensor info ``i``; return where its data ends, relative to the data section."""
        self.where = f"tensor info {i + 1} of {n_tensors}"
        name = self.string().decode("utf-8", errors="replace")
        self.where = f"tensor info {name!r}"
        n_dims = self.scalar(gguf.GGUFValueType.UINT32)
        if not 1 <= n_dims <= 4:
            raise ModelFileError(self.path, f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        shape = [self.scalar(gguf.GGUFValueType.UINT64) for _ in range(n_dims)]
        raw_type, offset = self.scalar(gguf.GGUFValueType.UINT32), self.scalar(gguf.GGUFValueType.UINT64)
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise ModelFileError(self.path, f"corrupt GGUF: tensor {name!r} has unknown type {raw_type}") from None
        return offset + math.prod(shape) // block * block_bytes


_SCALARS = {
    gguf.GGUFValueType.UINT8: struct.Struct("<B"),
    gguf.GGUFValueType.INT8: struct.Struct("<b"),
    gguf.GGUFValueType.UINT16: struct.Struct("<H"),
    gguf.GGUFValueType.INT16: struct.Struct("<h"),
    gguf.GGUFValueType.UINT32: struct.Struct("<I"),
    gguf.GGUFValueType.INT32: struct.Struct("<i"),
    gguf.GGUFValueType.FLOAT32: struct.Struct("<f"),
    gguf.GGUFValueType.BOOL: struct.Struct("<?"),
    gguf.GGUFValueType.UINT64: struct.Struct("<Q"),
    gguf.GGUFValueType.INT64: struct.Struct("<q"),
    gguf.GGUFValueType.FLOAT64: struct.Struct("<d"),
}


def check_safetensors(path: str | Path) -> None:
    """Check that a ``.safetensors`` file's header parses and its data is all there.

    Raises:
        ModelFileError: unreadable header, or data shorter than the header's byte ranges.
    """
    path = Path(path)
    head = _read_head(path, 8)
    size = path.stat().st_size
    if len(head) < 8:
        raise ModelFileError(path, f"truncated safetensors: {size} bytes")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
        raise ModelFileError(path, f"truncated safetensors: {size} bytes, the header alone needs {8 + n}")
    with path.open("rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelFileError(path, f"corrupt safetensors header: {exc}") from None
    if 8 + n + end > size:
        raise ModelFileError(path, f"truncated safetensors: {size} bytes, its tensors need {8 + n + end}")


def check_model_dir(path: str | Path) -> None:
    """Check that a transformers model directory has a config and complete weights.

    Raises:
        ModelFileError: no ``config.json``, no weights, a shard the index names is missing,
            or a truncated safetensors file.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(path, "no config.json: not a transformers model directory")
    weights = sorted(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern))
    if not weights:
        raise ModelFileError(path, "no model weights (*.safetensors or pytorch_model*.bin) beside config.json")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelFileError(index, f"names {len(missing)} missing shard(s): {', '.join(missing)}")
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file)


def parameter_count(model_dir: str | Path) -> int:
    """Weights in a model directory's safetensors files, counted from their headers (nothing is loaded).

    Raises:
        ModelFileError: no ``*.safetensors`` file in ``model_dir``, or a truncated one.
    """
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelFileError(Path(model_dir), "no *.safetensors weights to count")
    total = 0
    for path in files:
        check_safetensors(path)
        with safe_open(path, "np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += math.prod(f.get_slice(name).get_shape())
    return total


def read_adapter_config(path: str | Path) -> dict:
    """The ``adapter_config.json`` of a peft adapter directory, as a dict.

    Raises:
        ModelFileError: the file is missing, unreadable, not UTF-8 JSON, or not an object.
    """
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise ModelFileError(path, "no adapter_config.json (make one with `molting train`)")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelFileError(config_path, f"not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(config_path, f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise ModelFileError(config_path, f"expected a JSON object, got {type(config).__name__}")
    return config


def check_adapter_dir(path: str | Path) -> None:
    """Check that a peft adapter directory has its config (valid JSON) and weights.

    Raises:
        ModelFileError: no ``adapter_config.json`` or an invalid one, or no adapter weights.
    """
    path = Path(path)
    read_adapter_config(path)
    found = [path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not found:
        raise ModelFileError(path, f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if found[0].suffix == ".safetensors":
        check_safetensors(found[0])
