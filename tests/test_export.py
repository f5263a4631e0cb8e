"""GGUF export against the references: gguf-py reads the file back, llama.cpp runs it,
and its logits and tokens are compared with transformers' on the same tiny models."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from molting.errors import ExportError
from molting.export import QUANT_TYPES, quantize, write_gguf
from molting.export.gguf import SYSTEM_PROMPT_KEY, with_system_prompt
from molting.export.tokenizer import end_of_turn_id
from tests.conftest import CHATML_TEMPLATE, save_tiny_llama, train_bpe, wrap_tokenizer

# Quotes, a Jinja block end, braces, a backslash, a newline, accents and an emoji.
SYSTEM = 'Tu és o "Cláudio" — fala {{ pouco }} %} e usa \\n literal,\nduas linhas 😀'
PROMPT = "<|im_start|>user\nOlá! O gato vê as estrelas às 7h30, isn't it?<|im_end|>\n<|im_start|>assistant\n"


@contextlib.contextmanager
def llama(path, **kwargs):
    """A llama.cpp model with an F32 KV cache (the default F16 cache alone costs ~1e-2 in logits)."""
    options = dict(n_ctx=128, n_threads=2, verbose=False, type_k=llama_cpp.GGML_TYPE_F32)
    options.update(type_v=llama_cpp.GGML_TYPE_F32, **kwargs)
    llm = llama_cpp.Llama(str(path), **options)
    try:
        yield llm
    finally:
        llm.close()


def hf_logits(model_dir, ids: list[int]) -> np.ndarray:
    """transformers' logits, shape (len(ids), vocab)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path, ids: list[int], **kwargs) -> np.ndarray:
    """llama.cpp's logits for every position, shape (len(ids), vocab); ``kwargs`` go to ``Llama``."""
    with llama(path, logits_all=True, **kwargs) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def field(reader: gguf.GGUFReader, key: str):
    found = reader.get_field(key)
    assert found is not None, f"missing key {key}"
    return found.contents()


@pytest.fixture(scope="module")
def f32_export(tmp_path_factory, tiny_llama_dir):
    """The tiny llama as F32 GGUF with SYSTEM baked in, and the progress calls seen."""
    calls = []
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_llama_dir, path, system_prompt=SYSTEM, outtype="f32", progress=lambda *a: calls.append(a))
    return path, calls


def test_metadata_and_tensors_read_back(f32_export, tiny_llama_dir, tiny_tokenizer):
    path, calls = f32_export
    reader = gguf.GGUFReader(path)
    expected = {
        "general.architecture": "llama",
        "general.name": tiny_llama_dir.name,
        "general.file_type": gguf.LlamaFileType.ALL_F32,
        "llama.block_count": 2,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": len(tiny_tokenizer),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        SYSTEM_PROMPT_KEY: SYSTEM,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tiny_tokenizer.convert_ids_to_tokens(i) for i in range(len(tiny_tokenizer))]
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tiny_tokenizer) - 256 - 3
    template = field(reader, "tokenizer.chat_template")
    assert template.endswith(CHATML_TEMPLATE) and json.dumps(SYSTEM, ensure_ascii=False) in template

    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: (in, out)
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{b}.{t}.weight" for b in (0, 1) for t in per_block}
    assert set(shapes) == names  # tied embeddings: no output.weight
    assert shapes["blk.1.attn_k.weight"] == [64, 32] and shapes["blk.0.ffn_down.weight"] == [128, 64]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert calls == [(i, len(names)) for i in range(1, len(names) + 1)]


def test_f16_keeps_norms_f32(tmp_path, tiny_llama_dir):
    reader = gguf.GGUFReader(write_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype="f16"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert reader.get_field(SYSTEM_PROMPT_KEY) is None


@pytest.mark.parametrize(("outtype", "atol"), [("f32", 1e-3), ("f16", 5e-2)])
def test_llama_cpp_logits_match_transformers(tmp_path, tiny_llama_dir, tiny_tokenizer, outtype, atol):
    path = write_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype=outtype)
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = hf_logits(tiny_llama_dir, ids)
    np.testing.assert_allclose(llama_cpp_logits(path, ids), expected, atol=atol, rtol=0)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero logits


def test_logits_differ_without_qk_permutation(tmp_path, monkeypatch, tiny_llama_dir, tiny_tokenizer):
    """Negative control: the permutation is what makes the logits above match."""
    monkeypatch.setattr("molting.export.architectures.llama.permute_qk", lambda weight, n_head: weight)
    path = write_gguf(tiny_llama_dir, tmp_path / "unpermuted.gguf", outtype="f32")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    assert np.abs(llama_cpp_logits(path, ids) - hf_logits(tiny_llama_dir, ids)).max() > 0.1


def test_mistral_exports_as_llama(tmp_path, tiny_tokenizer):
    model_dir = save_tiny_llama(tmp_path / "mistral", tiny_tokenizer, hidden_size=64, architecture="mistral")
    path = write_gguf(model_dir, tmp_path / "m.gguf", outtype="f32")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    np.testing.assert_allclose(llama_cpp_logits(path, ids), hf_logits(model_dir, ids), atol=1e-3, rtol=0)


TEXTS = [
    PROMPT,
    "Ações, corações e pão de queijo: 1234567 barcos em 1999!",
    "  dois espaços,\ttab e\n\nlinhas   vazias  ",
    "It's what we'll do; they've said I'd 've known — ok?",
]


def test_llama_cpp_tokenizes_like_transformers(f32_export, tiny_tokenizer):
    with llama(f32_export[0], vocab_only=True) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tiny_tokenizer(text)["input_ids"]
        assert llm.token_eos() == 2 and llama_cpp.llama_vocab_is_eog(llm._model.vocab, 2)


def test_digit_splitting_pre_tokenizer_is_smollm(tmp_path):
    """SmolLM's pre-tokenizer (digits split one by one, then GPT-2) is recognised and matches."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer = wrap_tokenizer(train_bpe(split))
    path = write_gguf(save_tiny_llama(tmp_path / "m", tokenizer, 64), tmp_path / "m.gguf")
    assert field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == "smollm"
    with llama(path, vocab_only=True) as llm:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]


def test_tokenizer_pre_precedence(tmp_path, tiny_llama_dir):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (model_dir / "molting_source.json").write_text(json.dumps({"tokenizer_pre": "smollm"}))
    from_source = gguf.GGUFReader(write_gguf(model_dir, tmp_path / "a.gguf"))
    explicit = gguf.GGUFReader(write_gguf(model_dir, tmp_path / "b.gguf", tokenizer_pre="llama-bpe"))
    assert field(from_source, "tokenizer.ggml.pre") == "smollm"
    assert field(explicit, "tokenizer.ggml.pre") == "llama-bpe"


def test_end_of_turn_is_the_templates(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    assert end_of_turn_id(tokenizer, CHATML_TEMPLATE, tmp_path) == 2  # <|im_end|>, not EOS
    assert end_of_turn_id(tokenizer, "{{ messages[0]['content'] + eos_token }}", tmp_path) == 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_model_loads_and_generates(tmp_path, tiny_llama_256_dir, tiny_tokenizer, qtype):
    f16 = write_gguf(tiny_llama_256_dir, tmp_path / "m-f16.gguf", outtype="f16")
    calls = []
    path = quantize(f16, tmp_path / f"m-{qtype}.gguf", qtype, n_threads=2, progress=lambda *a: calls.append(a))
    reader = gguf.GGUFReader(path)
    assert calls == [(i, len(reader.tensors)) for i in range(1, len(reader.tensors) + 1)]  # one call per tensor
    assert field(reader, "general.file_type") == getattr(llama_cpp, QUANT_TYPES[qtype])
    block_type = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_K_M": gguf.GGMLQuantizationType.Q4_K}[qtype]
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == block_type
    assert path.stat().st_size < f16.stat().st_size
    with llama(path) as llm:
        out = llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1


def test_quantize_sums_up_fallbacks_in_one_warning(tmp_path, tiny_llama_dir, caplog):
    """Rows of 64 and 128 cannot hold Q4_K's 256-value super-blocks: one warning says so, with counts."""
    f16 = write_gguf(tiny_llama_dir, tmp_path / "m-f16.gguf", outtype="f16")
    with caplog.at_level(logging.WARNING, logger="molting.export.quantize"):
        quantize(f16, tmp_path / "m-q4.gguf", "Q4_K_M", n_threads=2)
    (record,) = caplog.records
    pattern = r"^m-q4.gguf: \d+ tensors fell back: q4_K -> q5_0 \(\d+\).*rows \(64, 128\) are not a multiple of 256$"
    assert re.search(pattern, record.message)


def test_quantize_failure_carries_llama_cpp_error_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ExportError, match="invalid magic"):
        quantize(bad, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_unknown_quantization_type(tmp_path):
    with pytest.raises(ExportError, match=r"'Q3_XYZ'.*Q4_K_M"):
        quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q3_XYZ")


def test_interrupted_export_leaves_no_file(tmp_path, monkeypatch, tiny_llama_dir):
    """A failure while tensor data is being written leaves the old file and no partial one."""
    from molting.export.architectures.llama import Llama

    original, passes = Llama.tensors, []

    def failing(self, state, config):
        passes.append(1)
        for i, item in enumerate(original(self, state, config)):
            if len(passes) == 2 and i == 5:  # second pass: the header is on disk already
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(Llama, "tensors", failing)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(tiny_llama_dir, out)
    assert len(passes) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert out.read_bytes() == b"previous export"


def test_unknown_architecture(tmp_path, tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"'FalconForCausalLM'.*LlamaForCausalLM"):
        write_gguf(tmp_path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_chat_completion_renders_baked_system_prompt(f32_export, tiny_tokenizer):
    """llama-cpp-python's chat handler (Jinja2 on the GGUF's template) adds SYSTEM by default."""
    user = [{"role": "user", "content": "Olá"}]
    expected = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nOlá<|im_end|>\n<|im_start|>assistant\n"
    with llama(f32_export[0]) as llm:
        seen, tokenize = [], llm.tokenize
        llm.tokenize = lambda text, *a, **k: seen.append(text.decode()) or tokenize(text, *a, **k)
        out = llm.create_chat_completion(user, max_tokens=1, temperature=0.0)
        own = [{"role": "system", "content": "Outro."}, *user]
        llm.create_chat_completion(own, max_tokens=1, temperature=0.0)
    assert seen[0] == expected
    assert out["usage"]["prompt_tokens"] == len(tiny_tokenizer(expected)["input_ids"])
    assert seen[-1].startswith("<|im_start|>system\nOutro.<|im_end|>") and SYSTEM not in seen[-1]
    # transformers renders the exported template the same way
    template = field(gguf.GGUFReader(f32_export[0]), "tokenizer.chat_template")
    rendered = tiny_tokenizer.apply_chat_template(
        user, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected


def test_no_system_prompt_leaves_template_unchanged():
    assert with_system_prompt(CHATML_TEMPLATE, None) == CHATML_TEMPLATE
    assert with_system_prompt(CHATML_TEMPLATE, "") == CHATML_TEMPLATE


def test_unrecognised_pre_tokenizer_is_refused_not_guessed(tmp_path):
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    model_dir = save_tiny_llama(tmp_path / "m", wrap_tokenizer(train_bpe(split)), 64)
    with pytest.raises(ExportError, match="unrecognised pre-tokenizer.*pass tokenizer_pre="):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))
    assert write_gguf(model_dir, tmp_path / "m.gguf", tokenizer_pre="gpt-2").is_file()


def test_an_interrupt_during_quantization_waits_for_llama_cpp_then_propagates():
    """Ctrl-C reaches the waiting thread (not a ctypes log callback, which would drop it),
    and the exception goes on only once the native call has returned."""
    import os
    import signal
    import time

    from molting.export.quantize import _in_worker_thread

    finished = []

    def native_call() -> int:
        time.sleep(0.1)  # the caller is waiting by now
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        finished.append(True)
        return 0

    with pytest.raises(KeyboardInterrupt):
        _in_worker_thread(native_call)
    assert finished == [True]
    assert _in_worker_thread(lambda a, b: a + b, 2, 3) == 5


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_corrupt_safetensors_named_and_no_file(tmp_path, tiny_llama_dir, damage):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        data[: len(data) - 1000] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"
    )
    with pytest.raises(ExportError, match=re.escape(str(weights))):
        write_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
