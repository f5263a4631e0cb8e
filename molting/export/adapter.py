"""A peft LoRA adapter as a llama.cpp adapter GGUF: one base file, many personas.

The format is the one llama.cpp loads with ``llama_adapter_lora_init`` (``--lora`` in its
tools; ``Llama(lora_path=...)`` in llama-cpp-python), as its ``src/llama-adapter.cpp`` reads
it and ``convert_lora_to_gguf.py`` writes it:

- ``general.type`` = ``adapter``, ``general.architecture`` = the base's (checked at load);
- ``adapter.type`` = ``lora`` and ``adapter.lora.alpha``; llama.cpp scales ``B @ A`` by
  ``alpha / r`` with ``r`` read from the tensors, as peft does;
- per adapted matrix ``<base GGUF tensor name>.lora_a`` with numpy shape ``(r, in)`` and
  ``.lora_b`` with shape ``(out, r)`` (ggml ``ne`` = ``[in, r]`` and ``[r, out]``: ``a.ne[0]``
  must equal the base tensor's ``ne[0]`` and ``b.ne[1]`` its ``ne[1]``).

GGUF names come from the architecture (``molting.export.architectures``), by passing
``lora_B`` through ``arch.tensors`` under the base weight's Hugging Face name: the rows of
``B`` are the output features, so the Q/K RoPE permutation applies to them as it does to
the base weight (``P (B A) = (P B) A``); ``A`` keeps its layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from molting.errors import ExportError
from molting.export.architectures import get_architecture
from molting.export.gguf import Progress, _weight_files, _write_tensors, read_safetensors
from molting.io import atomic_path

_PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}


def write_lora_gguf(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out_path: str | Path,
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write the peft LoRA adapter in ``adapter_dir`` as a llama.cpp adapter GGUF for ``base_dir``.

    Args:
        adapter_dir: ``adapter_config.json`` + ``adapter_model.safetensors`` (``molting train``).
        base_dir: the model directory the adapter was trained on; its GGUF (``write_gguf``)
            is the file the adapter is applied to.
        out_path: the ``.gguf`` to write; replaced atomically, nothing left on failure.
        name: ``general.name``; default: the adapter directory's name.
        progress: ``progress(done, total)`` after each tensor written.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: missing files; an adapter trained on another base (the name in
            ``adapter_config.json`` or a tensor shape differs); DoRA, per-module ranks or
            alphas, or fully trained modules (``modules_to_save``), which llama.cpp's
            format cannot carry.
    """
    from transformers import AutoConfig

    adapter_dir, base_dir, out_path = Path(adapter_dir), Path(base_dir), Path(out_path)
    lora = _adapter_config(adapter_dir)
    _check_base_name(lora, adapter_dir, base_dir)
    config = AutoConfig.from_pretrained(base_dir)
    arch = get_architecture((config.architectures or ["<none>"])[0])
    pairs = _pairs(adapter_dir / "adapter_model.safetensors")
    shapes = {n: a.shape for n, a in read_safetensors(_weight_files(base_dir), data=False)}
    _check_shapes(pairs, shapes, adapter_dir, base_dir)
    alpha = float(lora["lora_alpha"]) * (math.sqrt(lora["r"]) if lora.get("use_rslora") else 1.0)

    def tensors(data: bool) -> Iterator[tuple[str, np.ndarray]]:
        for base_name, (a, b) in pairs.items():
            ((gguf_name, b_rows),) = list(arch.tensors([(base_name, b)], config))
            yield f"{gguf_name}.lora_a", np.ascontiguousarray(a, dtype=np.float32)
            yield f"{gguf_name}.lora_b", np.ascontiguousarray(b_rows, dtype=np.float32)

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_name(name or adapter_dir.name)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            _write_tensors(writer, tensors, progress)
        finally:
            writer.close()
    return out_path


def _adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json``, refused when it holds what llama.cpp's LoRA cannot."""
    from molting.modelfiles import read_adapter_config

    path = adapter_dir / "adapter_config.json"
    if not path.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ExportError(
            f"{adapter_dir}: needs adapter_config.json and adapter_model.safetensors (make them with `molting train`)"
        )
    lora = read_adapter_config(adapter_dir)
    if lora.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{path}: peft_type {lora['peft_type']!r}; only LORA adapters can be written as GGUF")
    unsupported = {
        "use_dora": "DoRA",
        "rank_pattern": "per-module ranks",
        "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained modules",
    }
    for key, what in unsupported.items():
        if lora.get(key):
            raise ExportError(f"{path}: {key} ({what}) has no place in llama.cpp's LoRA adapter format")
    return lora


def _check_base_name(lora: dict, adapter_dir: Path, base_dir: Path) -> None:
    """The adapter's recorded base and ``base_dir`` must name the same model directory."""
    recorded = lora.get("base_model_name_or_path")
    if recorded and Path(recorded).name != base_dir.name and Path(recorded).resolve() != base_dir.resolve():
        raise ExportError(
            f"{adapter_dir}/adapter_config.json: the adapter was trained on {recorded!r}, not on {str(base_dir)!r}; "
            "pass the base it was trained on (--base)"
        )


def _pairs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{base weight HF name: (A (r, in), B (out, r))}`` from a peft ``adapter_model.safetensors``."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, array in read_safetensors([path]):
        module = key.removeprefix(_PEFT_PREFIX)
        suffix = next((s for s in _SUFFIXES if module.endswith(s)), None)
        if suffix is None:
            raise ExportError(
                f"{path}: tensor {key!r} is not a LoRA A/B matrix; llama.cpp's format has no place for it"
            )
        found.setdefault(module.removesuffix(suffix) + ".weight", {})[_SUFFIXES[suffix]] = array
    incomplete = sorted(name for name, ab in found.items() if set(ab) != {"a", "b"})
    if incomplete or not found:
        raise ExportError(f"{path}: no LoRA A/B pairs, or an incomplete pair for {incomplete}")
    return {name: (ab["a"], ab["b"]) for name, ab in found.items()}


def _check_shapes(pairs: dict[str, Any], shapes: dict[str, tuple], adapter_dir: Path, base_dir: Path) -> None:
    """Every adapted weight exists in the base with ``(out, in)`` = ``(B rows, A columns)``."""
    for name, (a, b) in pairs.items():
        expected = shapes.get(name)
        if expected is None or tuple(expected) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{adapter_dir}: the adapter does not fit {base_dir}: {name} is {expected and tuple(expected)} "
                f"in the base, the adapter's B @ A is {(b.shape[0], a.shape[1])} (trained on another base?)"
            )
