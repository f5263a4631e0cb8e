"""The GGUF writer's conversion: chunked, exact, and without a whole-tensor float32 copy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from molting.export import gguf as gguf_export
from molting.export.architectures.llama import permute_qk
from molting.export.gguf import _stored_tensors, read_safetensors, to_dtype


def bf16_bits(values: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bit patterns as uint16."""
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_to_dtype_equals_whole_tensor_conversion(monkeypatch, chunk, dtype):
    """Any chunk size, BF16/F16/F32 sources and a permuted (non-contiguous) view give
    exactly what converting the whole tensor through float32 gives."""
    monkeypatch.setattr(gguf_export, "CHUNK_ELEMENTS", chunk)
    values = torch.randn(24, 10, generator=torch.Generator().manual_seed(0)) * 300  # some overflow float16
    bits = bf16_bits(values)
    as_float32 = (bits.astype(np.uint32) << 16).view(np.float32)
    sources = {
        "bf16": (bits, as_float32),
        "f16": (values.numpy().astype(np.float16), values.numpy().astype(np.float16).astype(np.float32)),
        "f32": (values.numpy(), values.numpy()),
        "bf16 permuted": (permute_qk(bits, 4), permute_qk(as_float32, 4)),
        "bf16 1-D": (bits[3], as_float32[3]),
    }
    for label, (stored, reference) in sources.items():
        out = to_dtype(stored, dtype)
        assert out.dtype == dtype and out.flags.c_contiguous, label
        assert out.tobytes() == reference.astype(dtype).tobytes(), label


def test_stored_tensors_pass_bf16_bits_and_read_safetensors_widens(tmp_path):
    values = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "model.safetensors"
    save_file({"b": values.to(torch.bfloat16), "h": values.half()}, str(path))
    stored = dict(_stored_tensors([path]))
    assert stored["b"].dtype == np.uint16 and stored["h"].dtype == np.float16
    np.testing.assert_array_equal(stored["b"], bf16_bits(values))
    widened = dict(read_safetensors([path]))
    np.testing.assert_array_equal(widened["b"], values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(widened["h"], values.half().float().numpy())


def test_conversion_allocates_the_output_and_one_chunk(tmp_path, monkeypatch):
    """A mapped 1024 x 1024 BF16 tensor to F16: Python-side allocations peak at the 2 MiB
    output plus a chunk, not a 4 MiB float32 copy (the previous reader made two)."""
    monkeypatch.setattr(gguf_export, "CHUNK_ELEMENTS", 1 << 14)
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(1024, 1024).to(torch.bfloat16)}, str(path))
    (_, stored), = _stored_tensors([path])
    tracemalloc.start()
    try:
        out = to_dtype(stored, np.float16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == 2 << 20
    assert peak < out.nbytes + 8 * (1 << 14) * 4, f"peak {peak} bytes"
