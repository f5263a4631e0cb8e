"""Architectures the GGUF writer knows, registered by Hugging Face class name.

An architecture is a small flat class (see ``llama.py``) with:

- ``gguf_arch``: a ``gguf.MODEL_ARCH`` member, the ``general.architecture`` it writes;
- ``set_params(writer, config)``: the architecture's hyperparameter keys;
- ``tensors(state, config)``: a generator of ``(gguf_name, np.ndarray)`` pairs from
  ``(hf_name, np.ndarray)`` pairs, exactly one output per input weight it keeps (fused
  projections stay fused), so the same mapping names LoRA matrices. The writer runs it
  twice: first on read-only zero-stride placeholders (for the header: only names and
  shapes may come out of it, so it must not branch on values or write into its inputs),
  then on the weights as stored (float32, float16, or BF16 as uint16 bit patterns,
  converted by the writer afterwards), so it may rename, reshape and permute them but
  must not compute on their values;
- ``extra_tensors(config)``: tensors made from the config rather than the weights
  (Phi-3's long/short RoPE factors), written after the weights; usually none.

Adding an architecture is one new file with ``@register("XForCausalLM")`` on its class
and one import line at the bottom of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from molting.errors import ExportError


class Architecture(Protocol):
    """What ``write_gguf`` needs from an architecture."""

    gguf_arch: Any  # gguf.MODEL_ARCH

    def set_params(self, writer: Any, config: Any) -> None: ...

    def tensors(self, state: Iterable[tuple[str, np.ndarray]], config: Any) -> Iterator[tuple[str, np.ndarray]]: ...

    def extra_tensors(self, config: Any) -> Iterator[tuple[str, np.ndarray]]: ...


_REGISTRY: dict[str, type] = {}


def register(*hf_names: str) -> Callable[[type], type]:
    """Class decorator: register an architecture under one or more HF class names.

    Args:
        hf_names: values of ``config.architectures[0]``, e.g. ``"LlamaForCausalLM"``.
    """

    def decorate(cls: type) -> type:
        for hf_name in hf_names:
            if hf_name in _REGISTRY:
                raise ValueError(f"architecture {hf_name!r} is registered twice")
            _REGISTRY[hf_name] = cls
        return cls

    return decorate


def named_tensors(
    gguf_arch: Any, state: Iterable[tuple[str, np.ndarray]], config: Any
) -> Iterator[tuple[Any, str, np.ndarray]]:
    """``(tensor kind, gguf_name, array)`` for each HF tensor, by gguf-py's ``TensorNameMap``.

    The mapping every architecture shares: RoPE caches (``*.rotary_emb.inv_freq``) are
    skipped, and ``lm_head`` is dropped when embeddings are tied (llama.cpp reuses
    ``token_embd`` when ``output.weight`` is absent). Arrays pass through untouched.

    Args:
        gguf_arch: a ``gguf.MODEL_ARCH`` member.
        state: ``(hf_name, array)`` pairs, arrays in HF's ``(out, in)`` layout.
        config: the model's transformers config.

    Raises:
        ExportError: a tensor with no GGUF name.
    """
    import gguf

    names = gguf.TensorNameMap(gguf_arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, array in state:
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name for {gguf_arch.name}")
        kind, gguf_name = found
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            continue
        yield kind, gguf_name, array


def supported() -> list[str]:
    """The registered HF class names, sorted."""
    return sorted(_REGISTRY)


def get_architecture(hf_name: str) -> Architecture:
    """An instance of the architecture registered as ``hf_name``.

    Raises:
        ExportError: ``hf_name`` is not registered (the message lists those that are).
    """
    try:
        return _REGISTRY[hf_name]()
    except KeyError:
        raise ExportError(f"cannot export architecture {hf_name!r} to GGUF; supported: {supported()}") from None


# One import per architecture module; importing it registers it.
from molting.export.architectures import llama, phi3, qwen2  # noqa: E402, F401
