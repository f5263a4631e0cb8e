"""molting's tensor-by-tensor NF4 loader against transformers' own bitsandbytes loading, on CPU.

bitsandbytes 0.50 quantizes and runs NF4 on CPU, so both loaders run here; the GPU
memory the loader saves is measured by ``benchmarks`` on a GPU, not here.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from molting.backends.nf4 import load_nf4  # noqa: E402
from molting.backends.transformers import TransformersBackend  # noqa: E402
from molting.errors import ConfigError  # noqa: E402

MESSAGES = [{"role": "user", "content": "Quem é você?"}]
IDS = torch.tensor([[1, 5, 9, 30, 44, 100, 7, 250]])


def _transformers_nf4(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map={"": "cpu"}, dtype=torch.bfloat16
    )


def test_same_quantized_weights_and_logits_as_transformers(tiny_llama_256_dir):
    ours, theirs = load_nf4(tiny_llama_256_dir, "cpu"), _transformers_nf4(tiny_llama_256_dir)
    linears = {n for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert linears == {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 2 * 7 and "lm_head" not in linears
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, in bf16
    for name in linears:
        assert torch.equal(ours.get_submodule(name).weight.data, theirs.get_submodule(name).weight.data), name
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=0, atol=0)
    assert ours.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers computed, not left on meta


def test_backend_4bit_with_adapter_matches_transformers_loader(tiny_llama_256_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_256_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")

    texts = {}
    for loader in ("molting", "transformers"):
        backend = TransformersBackend(tiny_llama_256_dir, adapter=tmp_path / "adapter", dtype="4bit", loader=loader)
        assert isinstance(backend.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
        texts[loader] = backend.chat(MESSAGES, max_new_tokens=12)
        backend.close()
    assert texts["molting"] == texts["transformers"]
    plain = TransformersBackend(tiny_llama_256_dir, dtype="4bit")
    assert plain.chat(MESSAGES, max_new_tokens=12) != texts["molting"]  # the adapter is applied


def test_unknown_checkpoint_tensor_is_named(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["model.layers.0.mlp.gate_up_proj.weight"] = torch.zeros(4, 4)
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.gate_up_proj.weight' is not a parameter.*loader="):
        load_nf4(tmp_path / "m", "cpu")
