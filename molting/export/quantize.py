"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

The quantization types are llama.cpp's ``LLAMA_FTYPE_MOSTLY_*`` file types
(``include/llama.h``); block layouts are ggml's (``ggml/src/ggml-quants.c``).
K-quants (``*_K*``) quantize rows in super-blocks of 256 values; llama.cpp falls back
to another type for tensors whose rows are not a multiple of 256.
"""

from __future__ import annotations

from pathlib import Path

from molting.errors import ExportError
from molting.io import atomic_path

# name -> llama_cpp attribute holding the llama_ftype value
QUANT_TYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


def quantize(
    in_path: str | Path,
    out_path: str | Path,
    qtype: str = "Q4_K_M",
    *,
    n_threads: int = 0,
    verbose: bool = False,
) -> Path:
    """Quantize ``in_path`` (an F32/F16 GGUF) to ``out_path`` with llama.cpp.

    Args:
        in_path: source GGUF, usually ``write_gguf``'s F16 or F32 output.
        out_path: destination ``.gguf``; written to a temporary sibling, then renamed.
        qtype: a key of ``QUANT_TYPES`` (case-insensitive), e.g. ``"Q4_K_M"``.
        n_threads: quantization threads; 0 lets llama.cpp use all cores.
        verbose: let llama.cpp log every tensor (its warnings are always shown).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: unknown ``qtype``, missing input, or llama.cpp reports failure.
    """
    import ctypes
    import logging

    import llama_cpp

    name = qtype.upper()
    if name not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {qtype!r}; allowed: {list(QUANT_TYPES)}")
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise ExportError(f"{in_path}: GGUF file not found (make one with `molting export`)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[name])
    params.nthread = n_threads
    log = logging.getLogger("llama-cpp-python")  # gates llama.cpp's log callback
    level = log.level
    log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        with atomic_path(out_path) as tmp:
            status = llama_cpp.llama_model_quantize(
                str(in_path).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params)
            )
            if status != 0:
                raise ExportError(f"llama.cpp failed to quantize {in_path} to {name} (status {status})")
    finally:
        log.setLevel(level)
    return out_path
