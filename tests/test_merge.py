"""Merging a LoRA adapter: the merged model computes what base + adapter computed."""

import pytest
import torch

from molting.errors import ExportError
from molting.export import merge_adapter


def make_adapter(base_dir, out_dir):
    """A LoRA adapter on every projection, with non-zero B (peft initialises B to 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return peft_model.eval()


def test_merged_logits_equal_the_peft_models(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merged_dir = merge_adapter(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        original = base(input_ids=ids).logits
    assert (expected - original).abs().max() > 0.1  # the adapter changes the model visibly
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not any("lora" in key for key in merged.state_dict())
    assert (merged_dir / "tokenizer.json").is_file()


def test_merge_names_what_is_missing(tiny_llama_dir, tmp_path):
    with pytest.raises(ExportError, match="no adapter_config.json"):
        merge_adapter(tiny_llama_dir, tmp_path, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
