"""Tiny models and tokenizers built offline in seconds, shared by the whole test session.

``tiny_tokenizer``: a byte-level BPE (GPT-2 pre-tokenizer, which llama.cpp implements
as ``tokenizer.ggml.pre = "gpt-2"``) trained on generated Portuguese/English lines, with
SmolLM2's special tokens at SmolLM2's ids and SmolLM2's ChatML chat template.
``tiny_llama_dir`` / ``tiny_llama_256_dir``: random ``LlamaForCausalLM`` directories
(hidden 64, and 256 for K-quants, whose super-blocks are 256 values wide).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
# SmolLM2-135M-Instruct's chat_template.jinja, verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_SUBJECTS = ["O gato", "A Maria", "The old sailor", "Our teacher", "Um robô", "The river", "Você"]
_VERBS = ["come", "vê", "writes", "remembers", "canta", "crosses", "explica"]
_OBJECTS = [
    "o pão de queijo",
    "a long letter",
    "as estrelas",
    "the quiet harbour",
    "três histórias",
    "the 42 boats",
    "a canção de 1999",
    "ações e coração",
    "what's next?",
    "isn't it?",
]
_ENDINGS = [".", "!", "?", " — disse ele.", ", não é?", " every day.", " às 7h30."]


def corpus() -> list[str]:
    """A few hundred deterministic Portuguese/English lines (accents, digits, punctuation)."""
    lines = [
        f"{s} {v} {o}{e}"
        for s, v, o, e in itertools.islice(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS), 0, None, 7)
    ]
    return lines + ["Olá! Tudo bem? Hello, how are you?", "  indentação\tcom tab\n e nova linha"]


def train_bpe(pre_tokenizer=None, vocab_size: int = 400):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus()``.

    Args:
        pre_tokenizer: default ``ByteLevel(add_prefix_space=False)`` (GPT-2's regex).
        vocab_size: target size including the 256 byte symbols and the specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def wrap_tokenizer(tokenizer):
    """A transformers fast tokenizer around ``tokenizer``, configured like SmolLM2's."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def save_tiny_llama(directory: Path, tokenizer, hidden_size: int, architecture: str = "llama") -> Path:
    """Save a random 2-layer Llama (or Mistral) with ``tokenizer`` to ``directory``.

    Weights use ``initializer_range=0.2`` so attention is far from uniform and a
    wrong Q/K layout changes the logits visibly.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[architecture]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE, ~400 tokens, ChatML template, eos = pad = ``<|im_end|>``."""
    return wrap_tokenizer(train_bpe())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads, tied) + tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, hidden_size=64)


@pytest.fixture(scope="session")
def tiny_llama_256_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """As ``tiny_llama_dir`` with hidden size 256, so K-quants apply to every matrix."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_256"), tiny_tokenizer, hidden_size=256)


# TinyLlama-1.1B-Chat-v1.0's chat template (Zephyr), verbatim.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Phi-3-mini-4k-instruct's chat template, verbatim.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3's added tokens after its SentencePiece pieces, in Phi-3's order (32000 .. 32010 there).
PHI3_ADDED = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
# Qwen2's split regex, from its tokenizer.json.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_sentencepiece(vocab_size: int = 400) -> bytes:
    """A SentencePiece BPE model (``tokenizer.model`` bytes) shaped like Llama 2's.

    Byte fallback on (llama.cpp refuses SentencePiece vocabularies without the 256
    ``<0x..>`` pieces), digits split, identity normalization, whitespace kept,
    ``<unk>``/``<s>``/``</s>`` at ids 0/1/2.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() * 3),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_tokenizer(directory: Path, template: str, added: list[str] = (), **special):
    """A transformers Llama tokenizer read from a fresh ``tokenizer.model`` in ``directory``.

    Args:
        template: the chat template.
        added: tokens appended after the pieces, special except ``<|placeholder…|>`` ones
            (user-defined, so both added-token types are exercised); all but
            ``<|endoftext|>`` strip the whitespace after them (``rstrip``), as Phi-3's do.
        special: ``eos_token=``, ``pad_token=``, ... overrides (default Llama 2's).
    """
    import json

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(train_sentencepiece())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config.update(legacy=True, add_bos_token=True, add_eos_token=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens = [
        AddedToken(t, special=not t.startswith("<|placeholder"), normalized=False, rstrip=t != "<|endoftext|>")
        for t in added
    ]
    tokenizer.add_tokens(tokens)
    for key, value in special.items():
        setattr(tokenizer, key, value)
    tokenizer.chat_template = template
    return tokenizer


def save_with_tokenizer(model, tokenizer, directory: Path, spm_from: Path | None = None) -> Path:
    """Save ``model`` and ``tokenizer``, and ``tokenizer.model`` when it is a SentencePiece one."""
    import shutil

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if spm_from is not None and spm_from != directory:
        shutil.copy(spm_from / "tokenizer.model", directory / "tokenizer.model")
    return directory


def save_tiny_tinyllama(directory: Path) -> Path:
    """A TinyLlama-shaped model: Llama layers (hidden 64, 2 layers, GQA), SentencePiece, Zephyr template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = sentencepiece_tokenizer(directory, ZEPHYR_TEMPLATE)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return save_with_tokenizer(LlamaForCausalLM(config).eval(), tokenizer, directory)


def save_tiny_phi3(directory: Path, longrope: bool = False) -> Path:
    """A Phi-3-shaped model: fused QKV and gate/up, SentencePiece + Phi-3's added tokens, vocab padded to 64s.

    ``longrope``: Phi-3-mini-128k's RoPE config shape (131072 positions over an original
    4096, distinct long and short factors), at hidden size 64.
    """
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = sentencepiece_tokenizer(
        directory, PHI3_TEMPLATE, PHI3_ADDED, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    positions = 4096
    if longrope:
        half = 64 // 4 // 2  # head_dim / 2
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "long_factor": [1.0 + 0.5 * i for i in range(half)],
            "short_factor": [1.0 + 0.25 * i for i in range(half)],
            "original_max_position_embeddings": 4096,
        }
        positions = 131072
    config = Phi3Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=positions,
        original_max_position_embeddings=4096, rope_parameters=rope, sliding_window=2047, initializer_range=0.2,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return save_with_tokenizer(Phi3ForCausalLM(config).eval(), tokenizer, directory)


def qwen2_tokenizer():
    """Byte-level BPE with Qwen2's NFC normalizer, split regex and specials, and ChatML."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend = train_bpe(split)
    backend.normalizer = normalizers.NFC()
    tokenizer = wrap_tokenizer(backend)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.bos_token = None
    return tokenizer


def save_tiny_qwen2(directory: Path) -> Path:
    """A Qwen2-shaped model (Q/K/V biases, tied embeddings) with a Qwen2-style tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = qwen2_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random biases, so that dropping them would show in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return save_with_tokenizer(model, tokenizer, directory)


@pytest.fixture(scope="session")
def tiny_tinyllama_dir(tmp_path_factory) -> Path:
    return save_tiny_tinyllama(tmp_path_factory.mktemp("tiny_tinyllama"))


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory) -> Path:
    return save_tiny_phi3(tmp_path_factory.mktemp("tiny_phi3"))


@pytest.fixture(scope="session")
def tiny_phi3_longrope_dir(tmp_path_factory) -> Path:
    return save_tiny_phi3(tmp_path_factory.mktemp("tiny_phi3_128k"), longrope=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))
