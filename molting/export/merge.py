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
from molting.modelfiles import check_adapter_base  # noqa: F401 (kept importable from here)
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
