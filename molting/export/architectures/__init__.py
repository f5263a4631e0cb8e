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
and one import line at the bottom of this module; the protocol and the registry are in ``base.py``.
"""

from molting.export.architectures import llama, phi3, qwen2  # noqa: F401 (importing one registers it)
from molting.export.architectures.base import (  # _REGISTRY: the same dict, for tests that edit it
    _REGISTRY,  # noqa: F401
    Architecture,
    get_architecture,
    named_tensors,
    register,
    supported,
)

__all__ = ["Architecture", "get_architecture", "named_tensors", "register", "supported"]
