"""A model's tokenizer as GGUF ``tokenizer.ggml.*`` keys, in the two forms llama.cpp reads.

- **Byte-level BPE** (GPT-2, SmolLM, Qwen2, Llama 3): GGUF tokenizer model ``gpt2``,
  the vocabulary and merges of ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``)
  and a pre-tokenizer name (``tokenizer.ggml.pre``) that llama.cpp implements.
- **SentencePiece** (Llama 2, TinyLlama, Phi-3): GGUF tokenizer model ``llama``, every
  piece of ``tokenizer.model`` with its score and type (normal, unknown, control,
  user-defined, unused, byte ``<0x..>``), the added tokens of ``tokenizer.json`` /
  ``tokenizer_config.json`` after it, and the model's normalizer flags
  (``add_dummy_prefix``, ``remove_extra_whitespaces``).

In both forms ids up to the model's ``vocab_size`` that no token holds are written as
unused ``[PAD<id>]`` tokens (Phi-3 pads 32011 tokens to 32064 rows), and the token that
ends an assistant turn in the chat template is written as EOS and EOT and marked
CONTROL, so that llama.cpp stops by itself after an answer.

Sources: the GGUF spec's tokenizer section
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), what llama.cpp's
``src/llama-vocab.cpp`` reads, and sentencepiece's ``sentencepiece_model.proto``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from molting.errors import ExportError
from molting.models import SOURCE_FILE

logger = logging.getLogger(__name__)

# Tokens that close a turn in common chat templates.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# tokenizers pre-tokenizer pipelines whose splitting llama.cpp implements under a
# ``tokenizer.ggml.pre`` name (llama.cpp's src/llama-vocab.cpp): ByteLevel with its regex
# is GPT-2's pattern (``gpt-2``); Digits(individual_digits) before it adds llama.cpp's
# ``\p{N}`` split (``smollm``); Qwen2's Split regex, then ByteLevel without its own regex,
# is ``qwen2``. ``default`` is none of them: it also splits punctuation runs and digits in threes.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", QWEN2_PATTERN, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}
# The pre-tokenizer llama.cpp expects with a SentencePiece (``llama``) vocabulary.
SENTENCEPIECE_PRE = "default"
# Scores of tokens that are not SentencePiece pieces (added and padding tokens), as in
# llama.cpp's converter; the SentencePiece tokenizer never merges into them.
ADDED_TOKEN_SCORE = -1000.0
# sentencepiece_model.proto's ModelProto.SentencePiece.Type, by name, as GGUF token types.
PIECE_TYPES = {
    "NORMAL": gguf.TokenType.NORMAL,
    "UNKNOWN": gguf.TokenType.UNKNOWN,
    "CONTROL": gguf.TokenType.CONTROL,
    "USER_DEFINED": gguf.TokenType.USER_DEFINED,
    "UNUSED": gguf.TokenType.UNUSED,
    "BYTE": gguf.TokenType.BYTE,
}


def tokenizer_kind(model_dir: Path) -> str:
    """``"bpe"`` (byte-level BPE) or ``"sentencepiece"``, from the files in ``model_dir``.

    Read before transformers loads the tokenizer, so a missing file is named rather
    than met as a conversion error deep inside transformers.

    Raises:
        ExportError: no tokenizer file at all; or a SentencePiece-style ``tokenizer.json``
            (Metaspace, byte fallback, Unigram) without the ``tokenizer.model`` whose
            pieces, scores and types GGUF's ``llama`` tokenizer needs.
    """
    spm = model_dir / "tokenizer.model"
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        if _is_byte_level_bpe(tokenizer_json):
            return "bpe"
        if not spm.is_file():
            raise ExportError(
                f"{model_dir}: tokenizer.model is missing; tokenizer.json holds a SentencePiece-style tokenizer, "
                "and GGUF's 'llama' tokenizer needs the SentencePiece model's pieces, scores and types "
                "(copy tokenizer.model from the base model)"
            )
        return "sentencepiece"
    if spm.is_file():
        return "sentencepiece"
    if (model_dir / "vocab.json").is_file():
        return "bpe"
    raise ExportError(
        f"{model_dir}: no tokenizer.json or tokenizer.model (save the tokenizer with save_pretrained "
        "next to the model)"
    )


def _is_byte_level_bpe(tokenizer_json: Path) -> bool:
    try:
        backend = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model_type = backend["model"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{tokenizer_json}: not a tokenizers JSON file ({exc})") from None
    steps = json.dumps([backend.get("pre_tokenizer"), backend.get("decoder")])
    return model_type == "BPE" and "ByteLevel" in steps


def add_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, model_dir: Path, n_vocab: int, pre: str | None, template: str
) -> None:
    """All ``tokenizer.ggml.*`` keys of ``model_dir``'s tokenizer (byte-level BPE or SentencePiece).

    Args:
        writer: the GGUF writer, before its header is written.
        tokenizer: the transformers tokenizer of ``model_dir``.
        model_dir: where ``tokenizer.json`` / ``tokenizer.model`` and the generation config live.
        n_vocab: the model's ``vocab_size``, at least the tokenizer's; ids without a
            token are written as unused ``[PAD<id>]`` tokens.
        pre: explicit ``tokenizer.ggml.pre`` for a BPE tokenizer, or None to resolve it.
        template: the chat template, which names the end-of-turn token.

    Raises:
        ExportError: see ``tokenizer_kind``; more tokens than ``n_vocab``; a BPE tokenizer
            without merges or with an unrecognised pre-tokenizer.
    """
    if tokenizer_kind(model_dir) == "sentencepiece":
        tokens, scores, types = sentencepiece_vocab(model_dir / "tokenizer.model", tokenizer, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or SENTENCEPIECE_PRE)
        _add_normalizer_flags(writer, model_dir / "tokenizer.model")
    else:
        tokens, types = _bpe_vocab(tokenizer, n_vocab)
        scores = None
        merges = gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=()).merges
        if not merges:
            raise ExportError(f"{model_dir}: no BPE merges in tokenizer.json or merges.txt")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or _tokenizer_pre(model_dir, tokenizer))
        writer.add_token_merges(merges)
    eot = end_of_turn_id(tokenizer, template, model_dir)
    types[eot] = gguf.TokenType.CONTROL
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, tokenizer, eot)


# llama.cpp (src/llama-vocab.cpp) strips the whitespace after every special token but these
# of a model whose general.name contains "phi3" or "phi-3": what Phi-3's tokenizer declares
# with ``rstrip``. GGUF has no per-token key for it; the name is the switch.
PHI3_NAME_TAGS = ("phi3", "phi-3")
PHI3_NOT_STRIPPED = ("<unk>", "<s>", "<|endoftext|>")


def gguf_model_name(name: str, tokenizer: Any) -> str:
    """``general.name`` under which llama.cpp strips whitespace after special tokens as ``tokenizer`` does.

    A tokenizer whose special added tokens declare ``rstrip`` (Phi-3's) needs llama.cpp's
    Phi-3 rule, which llama.cpp applies by name: ``" (phi3)"`` is appended to a name
    without it. Without the rule a Phi-3 conversation tokenizes with a ``▁\n`` after
    every role token that transformers strips (measured: 79 tokens instead of 62).
    A name that says phi3 over a tokenizer that does not strip is kept, with a warning.

    Args:
        name: the wanted name (the persona's, or the model directory's).
        tokenizer: the transformers tokenizer being exported.
    """
    strips = any(
        token.special and token.rstrip and token.content not in PHI3_NOT_STRIPPED
        for token in tokenizer.added_tokens_decoder.values()
    )
    says_phi3 = any(tag in name.lower() for tag in PHI3_NAME_TAGS)
    if strips and not says_phi3:
        return f"{name} (phi3)"
    if says_phi3 and not strips:
        logger.warning(
            "general.name %r makes llama.cpp strip whitespace after special tokens, which this tokenizer "
            "does not do; llama.cpp will tokenize conversations differently from transformers",
            name,
        )
    return name


def _load_sentencepiece(path: Path) -> Any:
    """``tokenizer.model`` parsed as sentencepiece's ``ModelProto``.

    Raises:
        ExportError: the file is not a SentencePiece model.
    """
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise ExportError(f"{path}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise ExportError(f"{path}: a SentencePiece model without pieces")
    return proto


def sentencepiece_vocab(path: Path, tokenizer: Any, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and ``gguf.TokenType`` values for ids ``0 .. n_vocab-1``.

    The SentencePiece pieces come first with their own scores and types. Added tokens
    (transformers' ``added_tokens_decoder``: ``tokenizer.json``'s ``added_tokens`` and
    ``tokenizer_config.json``'s ``added_tokens_decoder``) that are not simply a piece
    re-declared at its own id take their id with score ``ADDED_TOKEN_SCORE``: CONTROL
    when special, else USER_DEFINED (llama.cpp matches those as raw text first).
    The remaining ids are UNUSED ``[PAD<id>]``.

    Args:
        path: the ``tokenizer.model`` file.
        tokenizer: the transformers tokenizer loaded from the same directory.
        n_vocab: the model's ``vocab_size``.

    Raises:
        ExportError: a piece or added token whose id is ``n_vocab`` or more.
    """
    proto = _load_sentencepiece(path)
    if len(proto.pieces) > n_vocab:
        raise ExportError(f"{path}: {len(proto.pieces)} pieces but the model's vocab_size is {n_vocab}")
    type_names = type(proto.pieces[0]).Type.Name
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [ADDED_TOKEN_SCORE] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i, piece in enumerate(proto.pieces):
        tokens[i], scores[i], types[i] = piece.piece, piece.score, PIECE_TYPES[type_names(piece.type)]
    for i, added in sorted(tokenizer.added_tokens_decoder.items()):
        if i >= n_vocab:
            raise ExportError(f"added token {added.content!r} has id {i} but the model's vocab_size is {n_vocab}")
        if i < len(proto.pieces) and proto.pieces[i].piece == added.content:
            continue
        tokens[i], scores[i] = added.content, ADDED_TOKEN_SCORE
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _add_normalizer_flags(writer: gguf.GGUFWriter, path: Path) -> None:
    """``add_space_prefix`` and ``remove_extra_whitespaces`` from the model's normalizer spec."""
    spec = _load_sentencepiece(path).normalizer_spec
    writer.add_add_space_prefix(spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(spec.remove_extra_whitespaces)


def _bpe_vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and ``gguf.TokenType`` values of a byte-level BPE for ids ``0 .. n_vocab-1``.

    Added special tokens are CONTROL, other added tokens USER_DEFINED (llama.cpp
    matches those as raw text before BPE), the rest NORMAL.
    """
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def _tokenizer_pre(model_dir: Path, tokenizer: Any) -> str:
    """``tokenizer.ggml.pre``: ``molting_source.json``'s, else recognised from ``PRE_TOKENIZERS``.

    Raises:
        ExportError: a pre-tokenizer molting does not recognise. Guessing would make
            llama.cpp split text differently from transformers, silently.
    """
    source = model_dir / SOURCE_FILE
    if source.is_file():
        recorded = json.loads(source.read_text()).get("tokenizer_pre")
        if recorded:
            return recorded
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    signature = _pre_signature(backend.get("pre_tokenizer"))
    if signature not in PRE_TOKENIZERS:
        raise ExportError(
            f"{model_dir}: unrecognised pre-tokenizer {signature}; pass tokenizer_pre= with llama.cpp's "
            "name for it (tokenizer.ggml.pre in src/llama-vocab.cpp, e.g. 'llama-bpe', 'qwen2')"
        )
    return PRE_TOKENIZERS[signature]


def _pre_signature(pre_tokenizer: dict | None) -> tuple:
    """The splitting-relevant fields of a tokenizers pre-tokenizer pipeline, as a tuple."""
    if not pre_tokenizer:
        return ()
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    signature = []
    for step in steps:
        if step["type"] == "ByteLevel":
            signature.append(("ByteLevel", step.get("use_regex", True), step.get("add_prefix_space", False)))
        elif step["type"] == "Digits":
            signature.append(("Digits", step.get("individual_digits", False)))
        elif step["type"] == "Split":
            pattern = step["pattern"].get("Regex", step["pattern"].get("String"))
            signature.append(("Split", pattern, step.get("behavior"), step.get("invert", False)))
        else:
            signature.append((step["type"],))
    return tuple(signature)


def _add_special_ids(writer: gguf.GGUFWriter, tokenizer: Any, eot: int) -> None:
    """BOS/EOS/EOT/PAD/UNK ids and ``add_bos_token``/``add_eos_token``.

    EOS and EOT are both the end-of-turn token ``eot`` (see ``end_of_turn_id``), so
    llama.cpp stops after an answer whatever it checks. A tokenizer without BOS gets
    ``eot`` as BOS; it is never added. Whether BOS/EOS are added is read off what the
    tokenizer does to ``"a"``.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eot
    probe = tokenizer("a")["input_ids"]
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eot)
    writer.add_eot_token_id(eot)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)


def end_of_turn_id(tokenizer: Any, template: str, model_dir: Path) -> int:
    """The id of the token that ends an assistant turn in ``template``.

    Candidates, in order: known end-of-turn tokens (``END_OF_TURN_TOKENS``), the
    tokenizer's EOS, then ``generation_config.json``'s ``eos_token_id`` (int or list);
    the first whose text appears in the template wins (``<|im_end|>`` for ChatML,
    ``<|end|>`` for Phi-3, whose generation config also lists ``<|assistant|>``, a
    token the template holds that opens a turn). Templates that only say ``eos_token``
    (Zephyr) get the tokenizer's EOS.

    Raises:
        ExportError: no candidate at all.
    """
    vocab = tokenizer.get_vocab()
    candidates = [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    candidates += [tokenizer.eos_token_id, *_generation_eos(model_dir)]
    for token_id in candidates:
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) in template:
            return token_id
    if tokenizer.eos_token_id is None:
        raise ExportError(f"{model_dir}: the tokenizer has no eos_token and the template no end-of-turn token")
    return tokenizer.eos_token_id


def _generation_eos(model_dir: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` as a list (empty when absent)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]
