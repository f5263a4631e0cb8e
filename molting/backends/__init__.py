"""Inference engines behind one interface. ``load_backend`` picks one from a path.

Engines are imported lazily: importing ``molting.backends`` loads neither torch nor
llama_cpp.
"""

from __future__ import annotations

from pathlib import Path

from molting.backends.base import Backend, Chunk, GenerationConfig, Memory, Message, Response
from molting.errors import ConfigError, ModelFileError

__all__ = ["Backend", "Chunk", "GenerationConfig", "Memory", "Message", "Response", "load_backend"]


def load_backend(model: str | Path, **options) -> Backend:
    """Open ``model`` with the engine that fits it.

    Args:
        model: a ``.gguf`` file (llama.cpp); a model directory (transformers); a
            peft adapter directory (transformers, base from its adapter_config.json);
            a ``molting run`` output directory (its GGUF); or an embedded model
            name such as ``smollm2-135m`` (its GGUF, through llama.cpp).
        **options: passed to the engine's constructor (``n_ctx``, ``dtype``, ...).

    Raises:
        ModelFileError: ``model`` is missing, or a file or directory that cannot be used
            (truncated or corrupt GGUF, wrong magic, no weights; see molting.modelfiles).
        ConfigError: nothing usable at ``model``.
    """
    from molting.models import EMBEDDED, embedded_gguf

    if str(model) in EMBEDDED:
        return _llamacpp(embedded_gguf(str(model)), **options)
    path = Path(model)
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        return _llamacpp(path, **options)
    if not path.exists():
        raise ModelFileError(path, f"no such file or directory, nor an embedded model ({', '.join(sorted(EMBEDDED))})")
    if (path / "adapter_config.json").is_file():
        return _transformers(_adapter_base(path), adapter=path, **options)
    if (path / "config.json").is_file():
        return _transformers(path, **options)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs:
        return _llamacpp(ggufs[-1], **options)
    raise ConfigError(
        f"{model}: not a .gguf file, model directory, adapter directory, run directory "
        f"or embedded model ({sorted(EMBEDDED)})"
    )


def _has_gguf_magic(path: Path) -> bool:
    from molting.modelfiles import GGUF_MAGIC

    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _llamacpp(path: Path, **options) -> Backend:
    from molting.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, **options)


def _transformers(path: Path | str, **options) -> Backend:
    from molting.backends.transformers import TransformersBackend

    return TransformersBackend(path, **options)


def _adapter_base(adapter: Path) -> Path:
    """The base model directory an adapter names, checked against the adapter as export checks it.

    Raises:
        ModelFileError: ``adapter_config.json`` is not valid JSON, or the weights are missing.
        ConfigError: it names no base, or one that is neither a local model directory nor an
            embedded model.
        ExportError: the adapter's LoRA shapes do not fit that base (trained on another one).
    """
    from molting.export.merge import check_adapter_base
    from molting.modelfiles import check_adapter_dir, read_adapter_config
    from molting.models import EMBEDDED, resolve_base_model

    check_adapter_dir(adapter)
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise ConfigError(f"{adapter}/adapter_config.json names no base_model_name_or_path")
    if not (Path(base) / "config.json").is_file() and base not in EMBEDDED:
        raise ConfigError(
            f"{adapter}/adapter_config.json: its base {base!r} is neither a local model directory "
            f"nor an embedded model ({', '.join(sorted(EMBEDDED))})"
        )
    base_dir = resolve_base_model(base)
    check_adapter_base(base_dir, adapter)
    return base_dir
