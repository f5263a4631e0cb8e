"""Phi-3 decoders (Phi-3-mini/medium, 4k and 128k) as GGUF ``phi3``.

What llama.cpp's ``phi3`` reads (``src/models/phi3.cpp``, ``src/llama-model.cpp``):

- the fused projections as they are: ``qkv_proj`` → ``blk.N.attn_qkv`` (rows Q, then K,
  then V) and ``gate_up_proj`` → ``blk.N.ffn_up`` (rows gate, then up; llama.cpp splits
  it in half for SwiGLU). No Q/K permutation: ``phi3`` uses NEOX RoPE, which rotates
  the two halves of each head as Hugging Face's ``rotate_half`` does.
- ``phi3.rope.dimension_count`` (``partial_rotary_factor * head_dim``),
  ``phi3.rope.scaling.original_context_length`` and ``phi3.attention.sliding_window``
  (llama.cpp reads it but runs full attention: within 2047 tokens they agree).
- for the 128k variants (``rope_type`` ``longrope``, formerly ``su``): the tensors
  ``rope_factors_long.weight`` and ``rope_factors_short.weight`` (``head_dim / 2``
  values each; llama.cpp takes the long ones when the context exceeds the original
  one, as transformers does for sequences longer than it) and
  ``phi3.rope.scaling.attn_factor``, the factor cos/sin are multiplied by:
  ``sqrt(1 + ln(s) / ln(original))`` with ``s = max_position_embeddings / original``
  unless the config gives ``attention_factor`` (transformers' ``_compute_longrope_parameters``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from molting.errors import ExportError
from molting.export.architectures.base import Architecture, register

ROPE_TYPES = ("default", "longrope", "su")


def _rope_parameters(config: Any) -> dict:
    """The config's RoPE parameters (transformers 5 ``rope_parameters``, 4.x ``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault(
        "original_max_position_embeddings",
        getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings,
    )
    return params


def _rope_dims(config: Any, params: dict) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) * head_dim)


def _is_longrope(params: dict) -> bool:
    return params["rope_type"] in ("longrope", "su")


@register("Phi3ForCausalLM")
class Phi3(Architecture):
    """Phi-3 decoder: RMSNorm, fused QKV and gate/up projections, SwiGLU, NEOX RoPE, optional LongRoPE."""

    gguf_arch = gguf.MODEL_ARCH.PHI3

    def set_params(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """Write ``phi3.*`` hyperparameters.

        Raises:
            ExportError: a RoPE type other than ``default`` or ``longrope``/``su``.
        """
        params = _rope_parameters(config)
        if params["rope_type"] not in ROPE_TYPES:
            raise ExportError(
                f"RoPE type {params['rope_type']!r} is not supported for phi3 export; supported: {list(ROPE_TYPES)}"
            )
        writer.add_context_length(config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(_rope_dims(config, params))
        writer.add_rope_freq_base(float(params["rope_theta"]))
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        writer.add_vocab_size(config.vocab_size)
        if _is_longrope(params):
            writer.add_rope_scaling_attn_factors(self._attention_factor(config, params))

    @staticmethod
    def _attention_factor(config: Any, params: dict) -> float:
        if params.get("attention_factor") is not None:
            return float(params["attention_factor"])
        original = params["original_max_position_embeddings"]
        scale = params.get("factor") or config.max_position_embeddings / original
        return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0

    def extra_tensors(self, config: Any) -> Iterator[tuple[str, np.ndarray]]:
        """LongRoPE's per-dimension factors, ``(rope_dims / 2,)`` float32 each; none otherwise.

        Raises:
            ExportError: missing factors, or factors of the wrong length.
        """
        params = _rope_parameters(config)
        if not _is_longrope(params):
            return
        expected = _rope_dims(config, params) // 2
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = params.get(key)
            if factors is None or len(factors) != expected:
                got = "none" if factors is None else len(factors)
                raise ExportError(f"longrope {key}: expected {expected} values (rope dimensions / 2), got {got}")
            yield f"{gguf.TENSOR_NAMES[tensor]}.weight", np.asarray(factors, dtype=np.float32)
