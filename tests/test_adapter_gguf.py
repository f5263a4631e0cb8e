"""A LoRA adapter as llama.cpp's adapter GGUF: applied to the base GGUF, it computes the merged model."""

import json
import shutil

import gguf
import numpy as np
import pytest

from molting.backends.llamacpp import LlamaCppBackend
from molting.errors import ConfigError, ExportError, ModelFileError
from molting.export import merge_adapter, write_gguf, write_lora_gguf
from tests.test_export import PROMPT, field, llama_cpp_logits
from tests.test_merge import make_adapter


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_llama_dir):
    """The tiny llama's F32 GGUF, a random LoRA adapter on every projection, and the merged F32 GGUF."""
    root = tmp_path_factory.mktemp("lora")
    make_adapter(tiny_llama_dir, root / "adapter")
    merged = merge_adapter(tiny_llama_dir, root / "adapter", root / "merged")
    return {
        "root": root,
        "adapter": root / "adapter",
        "base_gguf": write_gguf(tiny_llama_dir, root / "base.gguf", outtype="f32"),
        "merged_gguf": write_gguf(merged, root / "merged.gguf", outtype="f32"),
        "adapter_gguf": write_lora_gguf(root / "adapter", tiny_llama_dir, root / "adapter.gguf"),
    }


def test_adapter_gguf_is_llama_cpp_lora_format(lora):
    reader = gguf.GGUFReader(lora["adapter_gguf"])
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 16.0
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml ne order
    per_block = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(shapes) == {f"blk.{b}.{t}.weight.lora_{ab}" for b in (0, 1) for t in per_block for ab in "ab"}
    # a: ne [in, r], b: ne [r, out]; attn_k maps 64 -> 32 (2 KV heads of 16), ffn_down 128 -> 64
    assert shapes["blk.0.attn_k.weight.lora_a"] == [64, 4] and shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [128, 4] and shapes["blk.1.ffn_down.weight.lora_b"] == [4, 64]


def test_adapter_on_base_gives_the_merged_logits(lora, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    merged = llama_cpp_logits(lora["merged_gguf"], ids)
    applied = llama_cpp_logits(lora["base_gguf"], ids, lora_path=str(lora["adapter_gguf"]))
    base = llama_cpp_logits(lora["base_gguf"], ids)
    assert np.abs(merged - base).max() > 0.5  # the adapter changes the model visibly
    np.testing.assert_allclose(applied, merged, atol=1e-3, rtol=0)


def test_adapter_without_qk_permutation_does_not(lora, tiny_llama_dir, tiny_tokenizer, monkeypatch, tmp_path):
    """Negative control: B's rows must be permuted like the base's Q/K rows."""
    monkeypatch.setattr("molting.export.architectures.llama.permute_qk", lambda weight, n_head: weight)
    unpermuted = write_lora_gguf(lora["adapter"], tiny_llama_dir, tmp_path / "unpermuted.gguf")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    applied = llama_cpp_logits(lora["base_gguf"], ids, lora_path=str(unpermuted))
    assert np.abs(applied - llama_cpp_logits(lora["merged_gguf"], ids)).max() > 0.1


def test_llamacpp_backend_applies_the_adapter(lora, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    last = []
    for path, adapter in ((lora["base_gguf"], lora["adapter_gguf"]), (lora["merged_gguf"], None)):
        backend = LlamaCppBackend(path, n_ctx=128, n_threads=2, lora_path=adapter)
        backend.llm.eval(ids)
        last.append(np.ctypeslib.as_array(backend.llm._ctx.get_logits(), shape=(backend.llm.n_vocab(),)).copy())
        backend.close()
    np.testing.assert_allclose(last[0], last[1], atol=5e-2, rtol=0)  # F16 KV cache, as users run it
    assert np.abs(last[1] - llama_cpp_logits(lora["base_gguf"], ids)[-1]).max() > 0.5


def test_llamacpp_backend_names_a_missing_or_refused_adapter(lora, tmp_path):
    with pytest.raises(ModelFileError, match="none.gguf: file not found"):
        LlamaCppBackend(lora["base_gguf"], lora_path=tmp_path / "none.gguf")
    with pytest.raises(ConfigError, match="refused the adapter .*merged.gguf"):
        LlamaCppBackend(lora["base_gguf"], lora_path=lora["merged_gguf"])  # a model, not an adapter


def test_adapter_from_another_base_is_refused_by_name(lora, tiny_llama_256_dir, tmp_path):
    with pytest.raises(ExportError, match=r"trained on '.*tiny_llama.*', not on .*pass the base it was trained on"):
        write_lora_gguf(lora["adapter"], tiny_llama_256_dir, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_adapter_from_another_base_is_refused_by_shape(lora, tiny_llama_256_dir, tmp_path):
    """Same base name recorded, different shapes: the base has 256-wide projections, the adapter 64."""
    adapter = shutil.copytree(lora["adapter"], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_llama_256_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"does not fit .*down_proj.weight is \(256, 512\) in the base.*\(64, 128\)"):
        write_lora_gguf(adapter, tiny_llama_256_dir, tmp_path / "out" / "a.gguf")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_dora_adapter_is_refused(lora, tiny_llama_dir, tmp_path):
    adapter = shutil.copytree(lora["adapter"], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="use_dora"):
        write_lora_gguf(adapter, tiny_llama_dir, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_cli_export_adapter_only(lora, tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from molting.cli import app
    from tests.test_pipeline import make_persona

    (tmp_path / "persona").mkdir()
    make_persona(tmp_path / "persona")
    out = tmp_path / "claudio.lora.gguf"
    args = ["export", str(tmp_path / "persona"), "--adapter", str(lora["adapter"]), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--adapter-only", "--base", str(tiny_llama_dir)])
    assert result.exit_code == 0, result.output
    assert field(gguf.GGUFReader(out), "general.name") == "Cláudio"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claudio.lora.gguf", "claudio.lora.verify.json", "persona"]
    (check,) = json.loads((tmp_path / "claudio.lora.verify.json").read_text())["files"]
    assert check["quant"] == "F16 + LoRA" and check["top1"] >= 0.99 and check["mean_kl"] <= 1e-3


def test_adapter_export_fails_its_check_when_the_adapter_is_wrong(tiny_llama_256_dir, tmp_path, monkeypatch):
    """The check applies the adapter to the base's F16 GGUF in llama.cpp: a wrong B (doubled) is caught."""
    import molting.export.adapter
    from molting.export.verify import VerifyConfig
    from molting.pipeline import export_adapter_gguf
    from tests.test_pipeline import SilentUI, make_persona

    (tmp_path / "persona").mkdir()
    persona = make_persona(tmp_path / "persona")
    make_adapter(tiny_llama_256_dir, tmp_path / "adapter")
    out = tmp_path / "out" / "a.gguf"
    pairs = molting.export.adapter._pairs
    monkeypatch.setattr(
        molting.export.adapter, "_pairs", lambda path: {k: (a, 2 * b) for k, (a, b) in pairs(path).items()}
    )
    with pytest.raises(ExportError, match=r"F16 \+ LoRA GGUF does not compute what the model computes"):
        export_adapter_gguf(persona, tiny_llama_256_dir, tmp_path / "adapter", out, SilentUI(), VerifyConfig())
    assert sorted(p.name for p in out.parent.iterdir()) == []
