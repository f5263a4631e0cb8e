"""Bad input to the export: each error names the file and the problem, and no file is left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from molting.errors import ExportError
from molting.export import merge_adapter, write_gguf
from tests.test_merge import make_adapter


def outputs(directory) -> list[str]:
    """Files an export may have left: the GGUF or its temporary sibling."""
    return sorted(p.name for p in directory.iterdir() if ".gguf" in p.name or p.name.startswith(".merged"))


def test_sentencepiece_model_without_tokenizer_model(tiny_tinyllama_dir, tmp_path):
    model_dir = shutil.copytree(tiny_tinyllama_dir, tmp_path / "m")
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match=r"m: tokenizer.model is missing; tokenizer.json holds a SentencePiece"):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert outputs(tmp_path) == []


def test_no_tokenizer_files_at_all(tiny_llama_dir, tmp_path):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"m: no tokenizer.json or tokenizer.model"):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tiny_llama_dir, tmp_path, damage):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 64 if damage == "garbage" else data[: len(data) // 2])
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    unreadable = r"m/model.safetensors: (not a readable safetensors file|tensor .* lies outside the file)"
    with pytest.raises(ExportError, match=unreadable):
        write_gguf(model_dir, out)
    assert outputs(tmp_path) == ["m.gguf"] and out.read_bytes() == b"previous export"


def test_unknown_architecture_is_named(tiny_llama_dir, tmp_path):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GemmaForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"'GemmaForCausalLM'.*Phi3ForCausalLM.*Qwen2ForCausalLM"):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert outputs(tmp_path) == []


def test_adapter_of_another_base_by_name(tiny_llama_dir, tiny_tinyllama_dir, tmp_path):
    make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(ExportError, match=rf"adapter: trained on base '.*{tiny_llama_dir.name}', not on"):
        merge_adapter(tiny_tinyllama_dir, tmp_path / "adapter", tmp_path / "merged")
    assert outputs(tmp_path) == []


def test_adapter_of_another_base_by_shape(tiny_llama_dir, tiny_llama_256_dir, tmp_path):
    """Same directory name, other shapes: a 256-wide model's adapter on the 64-wide base."""
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base" / tiny_llama_256_dir.name)
    make_adapter(tiny_llama_256_dir, tmp_path / "adapter")
    pattern = r"adapter: lora_A of 'model.layers.0.mlp.down_proj' has shape \(4, 512\), .*base's \(64, 128\) weight"
    with pytest.raises(ExportError, match=pattern):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert outputs(tmp_path) == []
