"""Merge a LoRA adapter into its base model: W' = W + (alpha / r) * B @ A, saved as one model.

The base is always loaded in full precision. Merging into a 4-bit (QLoRA) base would
round the merged weights back to 4 bits and lose most of what the adapter learned;
quantization happens later, once, on the merged GGUF (``molting.export.quantize``).
Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), and
peft's ``merge_and_unload``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from molting.errors import ExportError
from molting.io import atomic_path
from molting.models import SOURCE_FILE


def merge_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: Any = None,
) -> Path:
    """Load ``base_dir``, apply the peft adapter in ``adapter_dir``, merge, save to ``out_dir``.

    Args:
        base_dir: the base model directory the adapter was trained on.
        adapter_dir: a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
            as ``molting train`` writes it.
        out_dir: the merged model directory; replaced atomically. It gets the model
            (safetensors), the base's tokenizer (with its SentencePiece
            ``tokenizer.model``, which GGUF export needs) and ``molting_source.json``.
        dtype: torch dtype to load and save in; default ``torch.float32``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ExportError: no ``adapter_config.json`` in ``adapter_dir``, no base model, or an
            adapter trained on another base (see ``check_adapter_base``).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (make an adapter with `molting train`)")
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir}: no config.json; is this the base model directory?")
    check_adapter_base(base_dir, adapter_dir)
    dtype = dtype or torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with atomic_path(out_dir, directory=True) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in (SOURCE_FILE, "tokenizer.model"):
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    return out_dir


def check_adapter_base(base_dir: Path, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another base, before any model is loaded.

    Two checks: the base's directory name against the last part of the adapter's
    ``base_model_name_or_path`` (what peft recorded at training), and every LoRA pair
    against the base weight it adapts: ``lora_A`` is ``(r, in_features)`` and
    ``lora_B`` ``(out_features, r)`` of that ``(out_features, in_features)`` weight.

    Raises:
        ExportError: naming the adapter, the base and the first difference.
    """
    from molting.modelfiles import read_adapter_config

    config = read_adapter_config(adapter_dir)
    trained_on = config.get("base_model_name_or_path")
    if trained_on and Path(trained_on).name != base_dir.name:
        raise ExportError(
            f"{adapter_dir}: trained on base {trained_on!r}, not on {str(base_dir)!r}; pass the base it was trained on"
        )
    base = _weight_shapes(base_dir)
    for key, shape in _weight_shapes(adapter_dir, "adapter_model*.safetensors").items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            continue  # modules_to_save, embedding LoRA: merged by peft, shapes checked there
        target = base.get(f"{module}.weight")
        if target is None:
            raise ExportError(f"{adapter_dir}: a LoRA for {module!r}, which the base {base_dir} does not have")
        a = kind == "A.weight"
        if (shape[1] if a else shape[0]) != (target[1] if a else target[0]):
            raise ExportError(
                f"{adapter_dir}: lora_{kind[0]} of {module!r} has shape {tuple(shape)}, which does not fit the "
                f"base's {tuple(target)} weight in {base_dir}: the adapter was trained on another base"
            )


def _weight_shapes(model_dir: Path, pattern: str = "*.safetensors") -> dict[str, list[int]]:
    """``{tensor name: shape}`` of the safetensors files in ``model_dir``, from their headers."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(model_dir.glob(pattern)):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})  # noqa: SIM118
    return shapes
