"""Write a Hugging Face model directory as one GGUF file for llama.cpp.

The file layout, key names and tensor names are the GGUF spec's
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) as gguf-py tabulates them
(``gguf.Keys``, ``gguf.TensorNameMap``); this module adds nothing to the format but
one custom key, ``molting.system_prompt``. Each architecture is a small class in
``molting.export.architectures``, looked up by ``config.architectures[0]``.

Weights are streamed: one pass over the safetensors files collects tensor shapes for
the header, a second pass converts and writes one tensor at a time, so no more than
one tensor is held in memory beside the memory-mapped files. The output is written
to a temporary sibling and renamed at the end (``molting.io.atomic_path``).
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
            _write_tensors(writer, lambda: _all_tensors(arch, files, config, dtype), progress)
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
    from safetensors import SafetensorError, safe_open

    for path in files:
        if not path.is_file():
            raise ExportError(f"{path}: missing (named by the model's safetensors index)")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float32 array)`` for every tensor, one tensor loaded at a time."""
    import torch
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, f.get_tensor(key).to(torch.float32).numpy()


def _all_tensors(arch: Architecture, files: list[Path], config: Any, dtype: type) -> Iterator[tuple[str, np.ndarray]]:
    """The converted weights, then the architecture's tensors made from the config (F32)."""
    yield from _converted(arch, files, config, dtype)
    for name, array in arch.extra_tensors(config):
        yield name, np.ascontiguousarray(array, dtype=np.float32)


def _converted(arch: Architecture, files: list[Path], config: Any, dtype: type) -> Iterator[tuple[str, np.ndarray]]:
    """The architecture's GGUF tensors, matrices cast to ``dtype``, 1-D tensors F32."""
    for name, array in arch.tensors(_read_safetensors(files), config):
        target = np.float32 if array.ndim <= 1 else dtype
        yield name, np.ascontiguousarray(array, dtype=target)


def _write_tensors(
    writer: gguf.GGUFWriter,
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]],
    progress: Progress | None,
) -> None:
    """Write header, metadata and tensors, streaming: a shape pass, then a data pass.

    Args:
        writer: a GGUFWriter with all key/values added and no tensor yet.
        tensors: returns a fresh generator of ``(gguf_name, array)`` each call.
        progress: ``progress(done, total)`` after each tensor written.
    """
    names = []
    for name, array in tensors():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        names.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (name, array) in enumerate(tensors(), start=1):
        if name != names[done - 1]:
            raise ExportError(f"tensor order changed between passes: {name!r} != {names[done - 1]!r}")
        writer.write_tensor_data(array)
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
