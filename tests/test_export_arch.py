"""SentencePiece, phi3 and qwen2 export against the references on tiny random models:
llama.cpp's logits against transformers', llama.cpp's tokens against transformers' (and
sentencepiece's), and the keys and tensors read back with gguf-py."""

from __future__ import annotations

import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from molting.errors import ExportError
from molting.export import write_gguf
from tests.test_export import field, hf_logits, llama, llama_cpp_logits

MODELS = ["tiny_tinyllama_dir", "tiny_phi3_dir", "tiny_phi3_longrope_dir", "tiny_qwen2_dir"]
# Accents, emoji, digits, code, runs of whitespace (inside and at the end of a text),
# and characters no tiny vocabulary holds (byte fallback in SentencePiece).
TEXTS = [
    "Olá, ação e coração: pão de queijo às 7h30!",
    "emoji 😀🎉 e ñ ü ß æ",
    "1234567890 e 3.14159, 1999 barcos",
    "def f(x):\n    return {'a': [1, 2]}  # ok\n",
    "dois  espaços,\ttab e\n\nlinhas   vazias  ",
    "Ж Ω 漢字 ∑ — 🦜",
    "It's what we'll do; they've said I'd 've known — ok?",
]
LOGIT_TEXT = "O gato vê as estrelas às 7h30 😀, isn't it?\ndef f(x):\n    return x  # 42"


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(reference || other) between next-token distributions, nats."""
    p = torch.log_softmax(torch.tensor(reference, dtype=torch.float64), dim=-1)
    q = torch.log_softmax(torch.tensor(other, dtype=torch.float64), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    """(model_dir, F16 GGUF, F32 GGUF) for each tiny model."""
    model_dir = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("gguf")
    f16 = write_gguf(model_dir, out / "m-f16.gguf", outtype="f16")
    return model_dir, f16, write_gguf(model_dir, out / "m-f32.gguf", outtype="f32")


def test_logits_match_transformers(exported):
    """F32: the same top-1 everywhere, KL ~ 0. F16: KL <= 1e-3 nats and the same top-1 wherever
    transformers' top two differ by more than F16 rounding can move a logit (0.05; measured <= 0.03)."""
    from transformers import AutoTokenizer

    model_dir, f16, f32 = exported
    ids = AutoTokenizer.from_pretrained(model_dir)(LOGIT_TEXT)["input_ids"]
    expected = hf_logits(model_dir, ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero logits
    exact = llama_cpp_logits(f32, ids)
    assert (expected.argmax(-1) == exact.argmax(-1)).all() and kl_divergence(expected, exact) <= 1e-6
    half = llama_cpp_logits(f16, ids)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.mean() >= 0.9
    assert (expected.argmax(-1) == half.argmax(-1))[clear].all()
    assert kl_divergence(expected, half) <= 1e-3


def test_llama_cpp_tokenizes_like_transformers(exported):
    from transformers import AutoTokenizer

    model_dir, path, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with llama(path, vocab_only=True) as llm:
        for text in TEXTS:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        with_bos = tokenizer(TEXTS[0])["input_ids"]
        assert llm.tokenize(TEXTS[0].encode(), add_bos=True, special=True)[: len(with_bos)] == with_bos


def test_byte_fallback_reaches_the_exported_byte_tokens(tiny_tinyllama_dir, tmp_path):
    """molting's GGUF of a SentencePiece vocabulary marks its 256 ``<0xNN>`` pieces as BYTE tokens,
    and llama.cpp, reading it, spells characters the vocabulary lacks with them (TEXTS[5])."""
    path = write_gguf(tiny_tinyllama_dir, tmp_path / "m.gguf", outtype="f16")
    reader = gguf.GGUFReader(path)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    byte_ids = {i for i, token in enumerate(tokens) if token.startswith("<0x") and token.endswith(">")}
    assert len(byte_ids) == 256 and {types[i] for i in byte_ids} == {gguf.TokenType.BYTE}
    with llama(path, vocab_only=True) as llm:
        ids = llm.tokenize(TEXTS[5].encode(), add_bos=False, special=True)
        assert sum(i in byte_ids for i in ids) >= 6
        assert llm.detokenize(ids).decode().removeprefix(" ") == TEXTS[5]  # SentencePiece's prefix space


def test_leading_spaces_follow_sentencepiece(tiny_tinyllama_dir, tmp_path):
    """A text that starts with spaces: llama.cpp adds the dummy prefix as sentencepiece does
    ('  a' -> three '▁'); transformers 5's Metaspace skips it (two). The reference is sentencepiece."""
    import sentencepiece

    path = write_gguf(tiny_tinyllama_dir, tmp_path / "m.gguf")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tinyllama_dir / "tokenizer.model"))
    with llama(path, vocab_only=True) as llm:
        for text in ("  dois espaços", "\tcom tab", "   "):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == processor.encode(text), text


def test_sentencepiece_vocabulary_read_back(tiny_phi3_dir, tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tiny_phi3_dir, tmp_path / "m.gguf", outtype="f32")
    reader = gguf.GGUFReader(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3_dir)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    n_vocab = field(reader, "phi3.vocab_size")
    n_pieces = len(tokenizer) - 11  # Phi-3's 11 added tokens follow the SentencePiece pieces
    assert n_vocab % 64 == 0 and n_vocab > len(tokenizer) == len(tokens) - (n_vocab - len(tokenizer))
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.pre") == "default"
    assert (tokens[:3], types[:3]) == (["<unk>", "<s>", "</s>"], [2, 3, 3])  # UNKNOWN, CONTROL, CONTROL
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {gguf.TokenType.BYTE}
    assert tokens[:n_pieces] == tokenizer.convert_ids_to_tokens(list(range(n_pieces)))
    assert scores[259] > scores[n_pieces - 1]  # pieces keep their SentencePiece scores (merge order)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokens[n_pieces : n_pieces + 11] == tokenizer.convert_ids_to_tokens(list(range(n_pieces, n_pieces + 11)))
    assert types[end] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<|placeholder1|>")] == gguf.TokenType.USER_DEFINED
    assert tokens[len(tokenizer):] == [f"[PAD{i}]" for i in range(len(tokenizer), n_vocab)]
    assert set(types[len(tokenizer):]) == {gguf.TokenType.UNUSED}
    assert field(reader, "tokenizer.ggml.eot_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == end
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.add_bos_token")
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True


def test_end_stops_phi3_generation(tiny_phi3_dir, tmp_path):
    """Forced by a logit bias, ``<|end|>`` ends generation at once and prints nothing;
    a control token that does not end a turn, forced the same way, does not stop it."""
    from transformers import AutoTokenizer

    path = write_gguf(tiny_phi3_dir, tmp_path / "m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3_dir)
    end, system = tokenizer.convert_tokens_to_ids(["<|end|>", "<|system|>"])
    prompt = "<|user|>\nOlá!<|end|>\n<|assistant|>\n"
    with llama(path) as llm:
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)
        stopped = llm.create_completion(prompt, max_tokens=8, temperature=0.0, logit_bias={end: 100.0})
        going = llm.create_completion(prompt, max_tokens=8, temperature=0.0, logit_bias={system: 100.0})
    choice = stopped["choices"][0]
    assert (choice["finish_reason"], choice["text"], stopped["usage"]["completion_tokens"]) == ("stop", "", 0)
    assert going["choices"][0]["finish_reason"] == "length" and going["usage"]["completion_tokens"] == 8


def test_phi3_keys_and_fused_tensors(tiny_phi3_dir, tmp_path):
    reader = gguf.GGUFReader(write_gguf(tiny_phi3_dir, tmp_path / "m.gguf", outtype="f32"))
    expected = {
        "general.architecture": "phi3",
        "phi3.context_length": 4096,
        "phi3.rope.scaling.original_context_length": 4096,
        "phi3.rope.dimension_count": 16,
        "phi3.attention.sliding_window": 2047,
        "phi3.block_count": 2,
        "phi3.feed_forward_length": 128,
    }
    assert {key: field(reader, key) for key in expected} == expected
    assert reader.get_field("phi3.rope.scaling.attn_factor") is None
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml order: (in, out)
    assert shapes["blk.0.attn_qkv.weight"] == [64, 3 * 64] and shapes["blk.1.ffn_up.weight"] == [64, 2 * 128]
    assert not any("rope_factors" in name or "attn_q." in name or "ffn_gate" in name for name in shapes)


def test_phi3_longrope_keys_and_factors(tiny_phi3_longrope_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_phi3_longrope_dir)
    reader = gguf.GGUFReader(write_gguf(tiny_phi3_longrope_dir, tmp_path / "m.gguf"))
    assert field(reader, "phi3.context_length") == 131072
    assert field(reader, "phi3.rope.scaling.original_context_length") == 4096
    assert field(reader, "phi3.rope.scaling.attn_factor") == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    tensors = {t.name: t for t in reader.tensors}
    for name, key in (("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight", "short_factor")):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensors[name].data, np.float32(config.rope_parameters[key]))


def test_longrope_logits_differ_without_attention_factor_or_factors(
    tiny_phi3_longrope_dir, tmp_path, monkeypatch
):
    """Negative controls: the attention factor and the short factors are what make the 128k logits match."""
    from transformers import AutoTokenizer

    from molting.export.architectures.phi3 import Phi3

    ids = AutoTokenizer.from_pretrained(tiny_phi3_longrope_dir)(LOGIT_TEXT)["input_ids"]
    expected = hf_logits(tiny_phi3_longrope_dir, ids)
    monkeypatch.setattr(Phi3, "_attention_factor", staticmethod(lambda config, params: 1.0))
    no_factor = write_gguf(tiny_phi3_longrope_dir, tmp_path / "a.gguf", outtype="f32")
    assert kl_divergence(expected, llama_cpp_logits(no_factor, ids)) > 1e-2
    monkeypatch.undo()
    original = Phi3.extra_tensors
    monkeypatch.setattr(
        Phi3, "extra_tensors", lambda self, config: ((n, np.ones_like(a)) for n, a in original(self, config))
    )
    ones = write_gguf(tiny_phi3_longrope_dir, tmp_path / "b.gguf", outtype="f32")
    assert kl_divergence(expected, llama_cpp_logits(ones, ids)) > 1e-2


def test_qwen2_keys_biases_and_pre_tokenizer(tiny_qwen2_dir, tmp_path):
    reader = gguf.GGUFReader(write_gguf(tiny_qwen2_dir, tmp_path / "m.gguf", outtype="f32"))
    assert field(reader, "general.architecture") == "qwen2"
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    names = {t.name for t in reader.tensors}
    assert {f"blk.{b}.attn_{p}.bias" for b in (0, 1) for p in "qkv"} <= names
    assert "output.weight" not in names  # tied embeddings


def test_unsupported_rope_type_is_refused_by_name(tiny_llama_dir, tmp_path):
    import json

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="RoPE type 'yarn' is not supported"):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_phi3_refuses_a_rope_type_it_cannot_write(tiny_phi3_dir):
    """transformers 5's Phi3Config admits only default and longrope; a 4.x-style config may say yarn."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from molting.export.architectures.phi3 import Phi3

    config = AutoConfig.from_pretrained(tiny_phi3_dir)
    legacy = SimpleNamespace(**{**config.to_dict(), "rope_parameters": None, "rope_scaling": {"type": "yarn"}})
    writer = gguf.GGUFWriter(None, "phi3")
    with pytest.raises(ExportError, match=r"RoPE type 'yarn' is not supported for phi3 export; supported: \['default'"):
        Phi3().set_params(writer, legacy)


def test_a_config_transformers_rejects_names_config_json(tiny_phi3_dir, tmp_path):
    import json

    model_dir = shutil.copytree(tiny_phi3_dir, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"(?s)m/config.json: .*dynamic"):
        write_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_phi3_chat_prompt_tokenizes_like_transformers(tiny_phi3_dir, tmp_path, monkeypatch):
    """A whole Phi-3 conversation, special tokens included, under a persona's name.

    Phi-3's role tokens strip the whitespace after them (``rstrip``); llama.cpp does that
    only for a ``general.name`` that says phi3, so the export appends it. Negative
    control: under the bare persona name llama.cpp keeps a ``▁\\n`` after every role token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3_dir)
    messages = [
        {"role": "system", "content": "Você é o Cláudio."},
        {"role": "user", "content": "Olá! Quem é você? 😀"},
        {"role": "assistant", "content": "Sou o Cláudio, de 1999."},
        {"role": "user", "content": "E agora?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(prompt)["input_ids"]
    path = write_gguf(tiny_phi3_dir, tmp_path / "m.gguf", name="Cláudio")
    assert field(gguf.GGUFReader(path), "general.name") == "Cláudio (phi3)"
    with llama(path, vocab_only=True) as llm:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == expected
    monkeypatch.setattr("molting.export.gguf.gguf_model_name", lambda name, tokenizer: name)
    bare = write_gguf(tiny_phi3_dir, tmp_path / "bare.gguf", name="Cláudio")
    with llama(bare, vocab_only=True) as llm:
        assert len(llm.tokenize(prompt.encode(), add_bos=True, special=True)) > len(expected)


def test_gguf_model_name_follows_the_tokenizer(tiny_phi3_dir, tiny_tinyllama_dir, caplog):
    from transformers import AutoTokenizer

    from molting.export.tokenizer import gguf_model_name

    phi3, tinyllama = (AutoTokenizer.from_pretrained(d) for d in (tiny_phi3_dir, tiny_tinyllama_dir))
    assert gguf_model_name("Cláudio", phi3) == "Cláudio (phi3)"
    assert gguf_model_name("Cláudio Phi-3", phi3) == "Cláudio Phi-3"
    assert gguf_model_name("Cláudio", tinyllama) == "Cláudio" and not caplog.records
    assert gguf_model_name("phi3-bot", tinyllama) == "phi3-bot"
    assert "strip whitespace after special tokens" in caplog.records[-1].message
