"""The architecture protocol and the registry of architectures by Hugging Face class name.

See the package docstring (``molting.export.architectures``) for what an architecture provides.
An architecture may subclass ``Architecture`` to take its default ``tensors`` (every tensor under
its gguf-py name, unchanged) and ``extra_tensors`` (none).
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

    def tensors(self, state: Iterable[tuple[str, np.ndarray]], config: Any) -> Iterator[tuple[str, np.ndarray]]:
        """Map HF tensors to GGUF names (``named_tensors``); fused projections stay fused, nothing permuted.

        The default for an architecture that subclasses this protocol (Phi-3, Qwen2); Llama
        overrides it to permute Q and K.

        Args:
            state: ``(hf_name, array)`` pairs, arrays in HF's ``(out, in)`` layout.
            config: the model's transformers config.

        Yields:
            ``(gguf_name, array)``, one per kept input; ``lm_head`` is dropped when
            embeddings are tied.

        Raises:
            ExportError: a tensor with no GGUF name.
        """
        for _, gguf_name, array in named_tensors(self.gguf_arch, state, config):
            yield gguf_name, array

    def extra_tensors(self, config: Any) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors made from the config rather than the weights; by default none."""
        return iter(())


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
