"""Qwen2 and Qwen2.5 decoders as GGUF ``qwen2``.

Llama's layout plus biases on the Q, K and V projections (``blk.N.attn_q.bias`` ...),
which llama.cpp's ``qwen2`` requires (``src/models/qwen2.cpp``). No Q/K permutation:
``qwen2`` uses NEOX RoPE, which rotates the two halves of each head as Hugging Face's
``rotate_half`` does. The tokenizer is byte-level BPE with Qwen2's own split regex,
recognised as ``tokenizer.ggml.pre = "qwen2"`` (``molting.export.tokenizer``).
"""

from __future__ import annotations

from typing import Any

import gguf

from molting.errors import ExportError
from molting.export.architectures.base import Architecture, register


def _rope(config: Any) -> tuple[float, str, float | None]:
    """``(theta, rope_type, factor)`` from a transformers 5 config (or a 4.x one)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default")), params.get("factor")


@register("Qwen2ForCausalLM")
class Qwen2(Architecture):
    """Qwen2 decoder: RMSNorm, SwiGLU MLP, NEOX RoPE, grouped-query attention with QKV biases."""

    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def set_params(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """Write ``qwen2.*`` hyperparameters.

        With ``use_sliding_window`` the context length is the window: llama.cpp's
        ``qwen2`` has full attention only, which equals sliding-window attention within it.

        Raises:
            ExportError: a RoPE scaling type other than ``default`` or ``linear``.
        """
        theta, rope_type, factor = _rope(config)
        if rope_type not in ("default", "linear"):
            raise ExportError(f"RoPE type {rope_type!r} is not supported for qwen2 export; supported: default, linear")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        context = config.max_position_embeddings
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            context = min(context, config.sliding_window)
        writer.add_context_length(context)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
