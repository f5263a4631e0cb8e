"""LlamaCppBackend's context options (n_batch, flash attention, KV cache types) and its LoRA adapter."""

import pytest

from molting.backends import GenerationConfig, load_backend
from molting.backends.transformers import TransformersBackend
from molting.errors import ConfigError
from molting.export.adapter import write_lora_gguf

MESSAGES = [{"role": "system", "content": "Você é o Cláudio."}, {"role": "user", "content": "Quem é você?"}]
# v_proj and down_proj: projections the GGUF writer does not permute (q_proj/k_proj are, for RoPE)
LORA_TARGETS = ["v_proj", "down_proj"]


@pytest.fixture(scope="module")
def gguf_256(tiny_llama_256_dir, tmp_path_factory):
    from molting.export import write_gguf

    return write_gguf(tiny_llama_256_dir, tmp_path_factory.mktemp("gguf") / "tiny256.F32.gguf", outtype="f32")


def test_context_options_reach_llama_cpp(gguf_256):
    import llama_cpp

    backend = load_backend(gguf_256, n_ctx=256, n_batch=32, flash_attn=True, type_k="q8_0", type_v="q8_0")
    try:
        params = backend.llm.context_params
        assert llama_cpp.llama_n_batch(backend.llm._ctx.ctx) == 32
        assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)
        assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        response = backend.generate(MESSAGES, GenerationConfig(max_new_tokens=8))
        assert response.completion_tokens > 0
    finally:
        backend.close()


def test_flash_attention_is_on_by_default(gguf_256):
    """As llama.cpp's own tools choose (``-fa auto``); off only when asked (benchmarks/llama-cpp-build.md)."""
    import llama_cpp

    on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    for options, expected in (({}, on), ({"flash_attn": False}, off)):
        backend = load_backend(gguf_256, n_ctx=256, **options)
        try:
            assert backend.llm.context_params.flash_attn_type == expected
        finally:
            backend.close()


def test_kv_cache_type_errors(gguf_256):
    with pytest.raises(ConfigError, match=r"type_k 'q3' not in"):
        load_backend(gguf_256, type_k="q3")
    with pytest.raises(ConfigError, match="type_v='q8_0' needs flash_attn=True"):
        load_backend(gguf_256, type_v="q8_0", flash_attn=False)


def _peft_adapter(model_dir, directory):
    """A random LoRA (B not zero, so it changes the answers) saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(directory)
    return directory


def test_lora_path_applies_the_adapter_as_peft_does(tiny_llama_256_dir, gguf_256, tmp_path):
    adapter_dir = _peft_adapter(tiny_llama_256_dir, tmp_path / "adapter")
    lora_gguf = write_lora_gguf(adapter_dir, tiny_llama_256_dir, tmp_path / "adapter.gguf")
    config = GenerationConfig(max_new_tokens=16)
    hf = TransformersBackend(tiny_llama_256_dir, adapter=adapter_dir)
    expected = hf.generate(MESSAGES, config).text
    hf.close()
    answers = {}
    for scale in (1.0, 0.0):
        backend = load_backend(gguf_256, n_ctx=256, lora_path=lora_gguf, lora_scale=scale)
        answers[scale] = backend.generate(MESSAGES, config).text
        backend.close()
    base = load_backend(gguf_256, n_ctx=256)
    assert answers[1.0] == expected
    assert answers[0.0] == base.generate(MESSAGES, config).text != expected
    base.close()


def test_unusable_lora_file_is_named(gguf_256, tmp_path):
    from molting.errors import ModelFileError

    bad = tmp_path / "adapter.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(60))  # a zip, say
    with pytest.raises(ModelFileError, match="adapter.gguf: not a GGUF file"):
        load_backend(gguf_256, lora_path=bad)
