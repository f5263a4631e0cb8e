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
