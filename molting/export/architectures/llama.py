"""Llama-family decoders (Llama, SmolLM, TinyLlama, Mistral) as GGUF ``llama``.

Hyperparameter keys follow the GGUF spec's ``[llm].*`` section
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md); tensor names come from
gguf-py's ``TensorNameMap`` for ``MODEL_ARCH.LLAMA``.

The one transformation is the rotary layout of ``q_proj``/``k_proj``. Hugging Face's
Llama rotates the two *halves* of each head (``rotate_half``: dimension ``i`` pairs
with ``i + head_dim/2``); llama.cpp's normal RoPE rotates *adjacent* pairs (``2i``
with ``2i+1``). ``permute_qk`` reorders the output rows of each head from
``[x0 .. x_{d/2-1}, y0 .. y_{d/2-1}]`` to ``[x0, y0, x1, y1, ...]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import gguf
import numpy as np

from molting.errors import ExportError
from molting.export.architectures.base import named_tensors, register

_PERMUTED = {gguf.MODEL_TENSOR.ATTN_Q: "num_attention_heads", gguf.MODEL_TENSOR.ATTN_K: "num_key_value_heads"}


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q or K projection rows from HF's half-split RoPE to llama.cpp's interleaved.

    Args:
        weight: ``(n_head * head_dim, in_features)`` weight or ``(n_head * head_dim,)`` bias,
            in the Hugging Face layout.
        n_head: heads of this projection (``num_key_value_heads`` for K under GQA).

    Returns:
        Same shape and dtype, rows of every head interleaved.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    tail = weight.shape[1:]
    split = weight.reshape(n_head, 2, head_dim // 2, *tail)
    return split.swapaxes(1, 2).reshape(weight.shape)


def _rope(config: Any) -> tuple[float, str, float | None]:
    """``(theta, rope_type, factor)`` from a transformers 5 config (or a 4.x one)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    return float(theta), rope_type, params.get("factor")


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama:
    """Llama decoder: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, optional tied head."""

    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def set_params(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """Write ``llama.*`` hyperparameters.

        Mistral's sliding window becomes the context length: within it, full attention
        (all llama.cpp's ``llama`` has) equals sliding-window attention.

        Raises:
            ExportError: a RoPE scaling type other than ``default`` or ``linear``.
        """
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        context = config.max_position_embeddings
        if getattr(config, "sliding_window", None):
            context = min(context, config.sliding_window)
        writer.add_context_length(context)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        theta, rope_type, factor = _rope(config)
        writer.add_rope_freq_base(theta)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        elif rope_type != "default":
            raise ExportError(f"RoPE type {rope_type!r} is not supported for export; supported: default, linear")

    def tensors(self, state: Iterable[tuple[str, np.ndarray]], config: Any) -> Iterator[tuple[str, np.ndarray]]:
        """Map HF tensors to GGUF names, permuting Q/K for llama.cpp's RoPE.

        Args:
            state: ``(hf_name, array)`` pairs, arrays in HF's ``(out, in)`` layout.
            config: the model's transformers config.

        Yields:
            ``(gguf_name, array)``; ``lm_head`` is dropped when embeddings are tied
            (llama.cpp reuses ``token_embd`` when ``output.weight`` is absent).

        Raises:
            ExportError: a tensor with no GGUF name.
        """
        for kind, gguf_name, array in named_tensors(self.gguf_arch, state, config):
            if kind in _PERMUTED:
                array = permute_qk(array, getattr(config, _PERMUTED[kind]))
            yield gguf_name, array

    def extra_tensors(self, config: Any) -> Iterator[tuple[str, np.ndarray]]:
        """None: everything ``llama`` needs is in the weights and the keys."""
        return iter(())
