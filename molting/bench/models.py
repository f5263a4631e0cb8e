"""The models molting benchmarks: the embedded SmolLM2 and random-weight stand-ins.

A random-weight model with a real model's exact configuration (``REFERENCE_CONFIGS``)
costs the same memory and time per token as the trained one: speed and memory depend on
shapes and types, not on values. Its tokenizer is a stand-in, a small byte-level BPE
(GPT-2 pre-tokenizer, ChatML template) that ``write_gguf`` pads with unused ids up to the
configuration's ``vocab_size``; the embedding and output matrices keep their full size.

Built files are cached under ``cache`` (``<name>/`` the transformers directory,
``<name>.<QUANT>.gguf`` the GGUF); building a 1.1B model takes minutes and GiBs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from molting.errors import ConfigError
from molting.io import atomic_path
from molting.models import EMBEDDED, REFERENCE_CONFIGS, reference_config, resolve_base_model

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STANDIN_VOCAB = 512  # trained BPE entries; ids above are unused padding up to vocab_size
_CORPUS = (
    "Olá! Eu sou o Cláudio, uma inteligência artificial curiosa e direta. ",
    "The quick brown fox jumps over the lazy dog while the river runs to the sea. ",
    "Molting measures memory and speed: load time, prefill and decode tokens per second. ",
    "0123456789 ações, coração, não, você, é, à, ç — punctuation: ;:!?()[]{}\"' ",
)


def random_model_dir(name: str, cache: Path) -> Path:
    """A transformers directory with ``name``'s configuration and random fp16 weights (cached).

    Args:
        name: a key of ``REFERENCE_CONFIGS`` (``tinyllama-1.1b``, ``phi-3-mini``, ...).
        cache: directory for built models.

    Returns:
        ``cache / f"random-{name}"``, built on first use with seed 0.

    Raises:
        ConfigError: unknown name.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = reference_config(name)
    target = Path(cache) / f"random-{name}"
    if (target / "config.json").is_file():
        return target
    tokenizer = standin_tokenizer()
    config_dict.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config_dict.pop("pad_token_id", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in fp16: half the memory and time of fp32
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "molting_random.json").write_text(json.dumps({"reference": name, "seed": 0}))
    return target


def standin_tokenizer():
    """A byte-level BPE of ``STANDIN_VOCAB`` entries with ChatML's special tokens at ids 0-2.

    Returns:
        A transformers ``PreTrainedTokenizerFast`` (bos ``<|im_start|>``, eos = pad ``<|im_end|>``)
        with the ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=STANDIN_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def model_dir(name: str, cache: Path) -> Path:
    """The transformers directory of a bench model: embedded name, model directory, reference name
    (random) or Hub id ``ORG/NAME[@REVISION]``.

    Any other name goes to ``molting.models.resolve_base_model``, so that whatever it resolves
    works here too.

    Raises:
        HubError: a Hub id that cannot be resolved.
        ConfigError: none of those.
    """
    if name in REFERENCE_CONFIGS and name not in EMBEDDED:
        return random_model_dir(name, cache)
    try:
        return resolve_base_model(name)
    except ConfigError:
        raise ConfigError(
            f"bench model {name!r} is not a .gguf file, a run directory, an embedded model {sorted(EMBEDDED)}, "
            f"a reference configuration {sorted(REFERENCE_CONFIGS)}, a directory with config.json or a Hub id ORG/NAME"
        ) from None


@dataclass(frozen=True)
class BenchModel:
    """What a name given to ``molting bench --model`` stands for.

    Attributes:
        name: as given.
        ggufs: GGUF files that exist already (the file itself, a run's exports); when empty,
            llama.cpp runs on GGUFs built from the transformers weights at the asked quantizations.
        weights: a run directory's transformers weights (``merged/`` or ``model/``).
        gguf_only: a bare GGUF file: no transformers case.
    """

    name: str
    ggufs: tuple[Path, ...] = ()
    weights: Path | None = None
    gguf_only: bool = False

    def model_dir(self, cache: Path) -> Path | None:
        """The transformers directory, built or imported on first use; None for a bare GGUF."""
        if self.gguf_only:
            return None
        return self.weights or model_dir(self.name, cache)


def resolve(name: str, cache: Path) -> BenchModel:
    """The one place a bench model name is resolved; nothing is built here.

    Args:
        name: a ``.gguf`` file; a ``molting run`` output directory (its ``merged/`` or
            ``model/`` weights and its ``*.gguf`` exports); a model directory
            (``config.json``); an embedded name; a reference name (random weights).
        cache: directory for built models (reference names).

    Raises:
        ConfigError: none of those, or a ``.gguf`` path that is not a file.
    """
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{name}: GGUF file not found")
        return BenchModel(name, (path,), gguf_only=True)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = tuple(p for p in sorted(path.glob("*.gguf")) if not p.name.startswith(".") and not _is_adapter(p))
        weights = next((path / d for d in ("merged", "model") if (path / d / "config.json").is_file()), None)
        if ggufs or weights:
            return BenchModel(name, ggufs, weights, gguf_only=weights is None)
    if name not in EMBEDDED and name not in REFERENCE_CONFIGS:
        model_dir(name, cache)  # raises for a name that is none of the above
    return BenchModel(name)


def _is_adapter(path: Path) -> bool:
    """True for a LoRA adapter GGUF (``general.type`` = ``adapter``), which llama.cpp cannot run alone."""
    import gguf

    try:
        field = gguf.GGUFReader(path).get_field("general.type")
    except Exception:  # noqa: BLE001 - an unreadable file is reported when llama.cpp opens it
        return False
    return field is not None and field.contents() == "adapter"


def gguf_quant(path: Path) -> str:
    """The quantization of a GGUF as its ``general.file_type`` name (``Q8_0``, ``Q4_K_M``); ``?`` when absent."""
    import gguf

    try:
        field = gguf.GGUFReader(path).get_field("general.file_type")
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field else "?"
    except Exception:  # noqa: BLE001 - an unreadable file is reported when llama.cpp opens it
        return "?"


def gguf_file(name: str, quant: str, cache: Path, n_threads: int = 0) -> Path:
    """``name``'s GGUF at ``quant`` (F16 written by molting, then llama.cpp's quantizer), cached.

    Args:
        name: as for :func:`model_dir`.
        quant: a key of ``molting.export.QUANT_TYPES``.
        cache: directory for built files.
        n_threads: quantization threads; 0 = every core.

    Raises:
        ConfigError: unknown model. ExportError: the architecture cannot be exported yet
            (checked before a reference model is built).
    """
    from molting.export.architectures import get_architecture
    from molting.export.gguf import write_gguf
    from molting.export.quantize import quantize

    slug = Path(name).name
    target = Path(cache) / f"{slug}.{quant.upper()}.gguf"
    if target.is_file():
        return target
    if name in REFERENCE_CONFIGS:  # fail before building gigabytes of random weights
        get_architecture(reference_config(name)["architectures"][0])
    source = model_dir(name, cache)
    f16 = Path(cache) / f"{slug}.F16.gguf"
    if not f16.is_file():
        write_gguf(source, f16, outtype="f16")
    if quant.upper() == "F16":
        return f16
    return quantize(f16, target, quant, n_threads=n_threads)
