"""Write a Hugging Face model directory as one GGUF file for llama.cpp.

The file layout, key names and tensor names are the GGUF spec's
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) as gguf-py tabulates them
(``gguf.Keys``, ``gguf.TensorNameMap``); this module adds nothing to the format but
one custom key, ``molting.system_prompt``. Each architecture is a small class in
``molting.export.architectures``, looked up by ``config.architectures[0]``.

Weights are streamed in two passes over the architecture's tensor generator. The first
feeds it zero-stride placeholders of the shapes in the safetensors headers (no weight
is read) to learn the GGUF header; the second maps one tensor at a time (gguf-py's
``SafetensorsLocal``, as llama.cpp's converter reads), hands the architecture the mapped
bytes in their stored dtype (BF16 as its uint16 bit patterns; its renames and Q/K
permutations are views), converts the result to the output dtype in row chunks, writes
it and unmaps it. Resident memory is then one output tensor, its mapped source and one
chunk, never a float32 copy of a whole tensor: for Phi-3-mini's 32064 x 3072 embedding,
197 MB (F16) + 197 MB (BF16 pages) instead of a further 394 MB (F32) and its temporaries.
The output is written to a temporary sibling and renamed at the end
(``molting.io.atomic_path``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from molting.errors import ExportError
from molting.export.architectures import Architecture, get_architecture
from molting.export.tokenizer import add_tokenizer, gguf_model_name, tokenizer_kind
from molting.io import atomic_path

OUTTYPES = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}
SYSTEM_PROMPT_KEY = "molting.system_prompt"

# safetensors dtype -> numpy dtype read from the file; BF16 is widened to F32 by bit shift.
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# Elements converted at a time (16 MB of float32 temporaries).
CHUNK_ELEMENTS = 1 << 22

Progress = Callable[[int, int], None]


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    tokenizer_pre: str | None = None,
    outtype: str = "f16",
    name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a transformers model directory (config.json, safetensors, tokenizer) to GGUF.

    Args:
        model_dir: directory written by ``save_pretrained`` (a merged model).
        out_path: the ``.gguf`` file to write; replaced atomically.
        system_prompt: the persona's system prompt, baked into the chat template as the
            default system message and stored raw under ``molting.system_prompt``.
        chat_template: Jinja chat template; default: the tokenizer's.
        tokenizer_pre: llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``); default:
            ``molting_source.json`` in ``model_dir``, else recognised from the
            tokenizer's pre-tokenizer (``molting.export.tokenizer.PRE_TOKENIZERS``),
            else an ExportError; ``"default"`` for a SentencePiece tokenizer.
        outtype: ``"f16"`` or ``"f32"`` for matrices; 1-D tensors (norms) stay F32.
        name: ``general.name``; default: the directory name. `` (phi3)`` is appended for a
            tokenizer that needs llama.cpp's Phi-3 whitespace rule (``gguf_model_name``).
        progress: called as ``progress(done, total)`` after each tensor is written.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: unknown ``outtype``, architecture or RoPE type; no weights or a
            corrupt safetensors file; no chat template; no tokenizer file, or a
            SentencePiece tokenizer without its ``tokenizer.model``. Each names the file.
    """
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown outtype {outtype!r}; allowed: {sorted(OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir}: no config.json (save the model with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises ValueError, KeyError, its own validation errors...
        raise ExportError(f"{model_dir / 'config.json'}: transformers cannot read it: {exc}") from None
    arch = get_architecture((config.architectures or ["<none>"])[0])
    files = _weight_files(model_dir)
    _check_safetensors(files)
    tokenizer_kind(model_dir)  # names a missing tokenizer file before transformers meets it
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ExportError(f"{model_dir}: the tokenizer has no chat template; pass chat_template=")
    dtype, file_type = OUTTYPES[outtype]
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        try:
            _add_general(writer, gguf_model_name(name or model_dir.name, tokenizer), file_type, system_prompt)
            arch.set_params(writer, config)
            add_tokenizer(writer, tokenizer, model_dir, config.vocab_size, tokenizer_pre, template)
            writer.add_chat_template(with_system_prompt(template, system_prompt))
            _write_tensors(writer, lambda data: _all_tensors(arch, files, config, dtype, data), progress)
        finally:
            writer.close()
    return out_path


def with_system_prompt(template: str, system_prompt: str | None) -> str:
    """Prefix ``template`` so that ``system_prompt`` is the default system message.

    When the conversation does not start with a system message, the prefix prepends
    ``{'role': 'system', 'content': system_prompt}`` to ``messages`` before the
    template runs; the prefix itself renders nothing. The prompt is a JSON string
    literal, which Jinja reads back unchanged (quotes, newlines, ``%}`` included).

    Args:
        template: a Jinja chat template iterating over ``messages``.
        system_prompt: the default system message; None or "" leaves the template as is.
    """
    if not system_prompt:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages %}"
        "{%- endif %}" + template
    )


def _weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files: those of the shard index, else ``model*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no model*.safetensors weights (save the model with save_pretrained)")
    return files


def _check_safetensors(files: list[Path]) -> None:
    """Read every file's safetensors header, so a missing or corrupt file fails before any output.

    Raises:
        ExportError: a file is missing, or its header cannot be read (garbage, truncated).
    """
    for path in files:
        if not path.is_file():
            raise ExportError(f"{path}: missing (named by the model's safetensors index)")
    for _ in read_safetensors(files, data=False):
        pass


def read_safetensors(files: list[Path], data: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float32 array)`` for every tensor of ``files``, in name order.

    Args:
        files: safetensors files.
        data: False yields read-only zero-stride placeholders of each tensor's shape
            (nothing is read from disk); True maps each tensor's bytes on its own and
            converts them, so the mapping is released with the array.

    Raises:
        ExportError: a file that is not safetensors or is cut short, or a dtype other
            than F32/F16/BF16.
    """
    for name, stored in _stored_tensors(files, data):
        yield name, (to_dtype(stored, np.float32) if data else stored)


def _stored_tensors(files: list[Path], data: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, array)`` for every tensor of ``files`` in name order, as stored.

    With ``data`` each array is a copy-on-write mapping of the tensor's own bytes:
    float32 or float16, or uint16 bit patterns for BF16 (``to_dtype`` converts all
    three). Without, a float32 zero-stride placeholder of the tensor's shape.

    Raises:
        ExportError: as ``read_safetensors``.
    """
    from gguf.utility import SafetensorsLocal

    for path in files:
        try:
            tensors = SafetensorsLocal(path).tensors
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None
        size = path.stat().st_size
        for name, tensor in tensors.items():
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ExportError(f"{path}: tensor {name!r} is {tensor.dtype}; supported: {sorted(SAFETENSORS_DTYPES)}")
            expected = int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[tensor.dtype]).itemsize
            end = tensor.data_range.offset + tensor.data_range.size
            if tensor.data_range.size != expected or end > size:
                raise ExportError(f"{path}: tensor {name!r} lies outside the file or has the wrong size (corrupt?)")
            if data:
                yield name, tensor.mmap_bytes().view(SAFETENSORS_DTYPES[tensor.dtype]).reshape(tensor.shape)
            else:
                yield name, np.broadcast_to(np.float32(0), tensor.shape)


def to_dtype(stored: np.ndarray, dtype: type) -> np.ndarray:
    """A new C-contiguous ``dtype`` array from ``stored``, converted ``CHUNK_ELEMENTS`` at a time.

    Args:
        stored: float32 or float16 values, or uint16 BF16 bit patterns (widened to float32
            exactly by a 16-bit shift), in any layout (a permuted view of a mapping).
        dtype: ``np.float32`` or ``np.float16``; float32 -> float16 rounds to nearest even,
            as ``ndarray.astype`` does, so the result equals converting the whole tensor
            at once.

    Returns:
        The converted array; temporaries are one chunk, not the tensor.
    """
    out = np.empty(stored.shape, dtype=dtype)
    if stored.ndim == 0:
        out[()] = _chunk_to_float(stored)
        return out
    rows = max(1, CHUNK_ELEMENTS // max(1, stored[0].size))
    for start in range(0, stored.shape[0], rows):
        out[start:start + rows] = _chunk_to_float(stored[start:start + rows])
    return out


def _chunk_to_float(chunk: np.ndarray) -> np.ndarray:
    """One chunk as float32 (BF16 bit patterns shifted) or, when already float, as is."""
    if chunk.dtype == np.uint16:
        widened = chunk.astype(np.uint32)
        widened <<= 16
        return widened.view(np.float32)
    return chunk


def _all_tensors(
    arch: Architecture, files: list[Path], config: Any, dtype: type, data: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """The converted weights, then the architecture's tensors made from the config (F32, small)."""
    yield from _converted(arch, files, config, dtype, data)
    for name, array in arch.extra_tensors(config):
        yield name, np.ascontiguousarray(array, dtype=np.float32)


def _converted(
    arch: Architecture, files: list[Path], config: Any, dtype: type, data: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """The architecture's GGUF tensors, matrices cast to ``dtype``, 1-D tensors F32.

    The architecture sees the stored arrays (``_stored_tensors``), so BF16 reaches it as
    uint16 bit patterns: it may rename, reshape and permute them, not compute on them.
    With ``data=False`` the arrays are placeholders of the right shape and dtype
    (``read_safetensors``); nothing is read or converted.
    """
    for name, array in arch.tensors(_stored_tensors(files, data), config):
        target = np.float32 if array.ndim <= 1 else dtype
        if data:
            yield name, to_dtype(array, target)
        else:
            yield name, np.broadcast_to(np.zeros((), dtype=target), array.shape)
        del array  # the mapping is released before the architecture reads the next tensor


def _write_tensors(
    writer: gguf.GGUFWriter,
    tensors: Callable[[bool], Iterator[tuple[str, np.ndarray]]],
    progress: Progress | None,
) -> None:
    """Write header, metadata and tensors, streaming: a shape pass, then a data pass.

    Args:
        writer: a GGUFWriter with all key/values added and no tensor yet.
        tensors: ``tensors(data)`` returns a fresh generator of ``(gguf_name, array)``;
            with ``data=False`` the arrays only need the right shape and dtype.
        progress: ``progress(done, total)`` after each tensor written.
    """
    names = []
    for name, array in tensors(False):
        writer.add_tensor_info(name, array.shape, array.dtype, array.size * array.dtype.itemsize)
        names.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (name, array) in enumerate(tensors(True), start=1):
        if name != names[done - 1]:
            raise ExportError(f"tensor order changed between passes: {name!r} != {names[done - 1]!r}")
        writer.write_tensor_data(array)
        del array  # freed before the next tensor is converted
        if progress is not None:
            progress(done, len(names))
    writer.flush()


def _add_general(writer: gguf.GGUFWriter, name: str, file_type: int, system_prompt: str | None) -> None:
    """``general.*`` keys, and ``molting.system_prompt`` when there is one."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if system_prompt:
        writer.add_string(SYSTEM_PROMPT_KEY, system_prompt)
