"""Bases named by their Hugging Face Hub id (``ORG/NAME[@REVISION]``), resolved offline from a
cache this file builds in huggingface_hub's own layout; no test reaches the network.

huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import; molting reads them
at each call (``molting.models.hub_cache``/``hub_offline``), so ``monkeypatch.setenv`` is honoured.
A gated or missing repository needs the Hub to answer: those cases raise huggingface_hub's own
exception classes from a patched ``snapshot_download`` and check molting's line for each.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import errors

from molting import registry
from molting.errors import HubError
from molting.models import BaseModel, is_hub_id, resolve_base, resolve_base_model
from molting.persona import Persona
from tests.test_pipeline import make_persona

REPO = "tiny-org/tiny-llama"
COMMIT = hashlib.sha1(b"molting test commit").hexdigest()


def fill_hub_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT, refs: tuple = ("main",)) -> Path:
    """Put ``source``'s files into ``cache`` as huggingface_hub lays a downloaded snapshot out.

    ``models--ORG--NAME/blobs/<sha256>`` holds each file's bytes, ``snapshots/<commit>/<file>`` is a
    relative symlink to its blob, and ``refs/<ref>`` holds the commit hash.

    Returns:
        The snapshot directory.
    """
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (storage / "refs").mkdir()
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def persona_dir(tmp_path: Path) -> Path:
    """A small persona directory (``tests.test_pipeline.make_persona``) under ``tmp_path``."""
    path = tmp_path / "persona"
    if not path.exists():
        path.mkdir()
        make_persona(path)
    return path


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_llama_dir) -> Path:
    """An offline Hugging Face cache holding ``REPO`` (the tiny Llama) at ``COMMIT``, tagged ``v1``."""
    cache = tmp_path / "hf-cache"
    fill_hub_cache(cache, REPO, tiny_llama_dir, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("microsoft/Phi-3-mini-4k-instruct") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("smollm2-135m") and not is_hub_id("a/b/c") and not is_hub_id("./x/y")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id(tmp_path / "org" / "name")  # an existing path is a path


def test_a_cached_hub_model_resolves_offline_by_id_tag_and_commit(offline_cache):
    snapshot = (offline_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT).resolve()
    for name, revision in ((REPO, None), (f"{REPO}@v1", "v1"), (f"{REPO}@{COMMIT}", COMMIT)):
        assert resolve_base(name) == BaseModel(snapshot, "hub", REPO, revision, COMMIT)
    assert resolve_base_model(REPO) == snapshot


def test_cli_train_on_a_hub_id_records_the_commit(offline_cache, tmp_path):
    from typer.testing import CliRunner

    from molting.cli import app

    out, runs = tmp_path / "run", tmp_path / "runs"
    args = ["train", str(persona_dir(tmp_path)), "--base", f"{REPO}@v1", "--out", str(out), "--runs", str(runs)]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--r", "2", "--lora-alpha", "4", "--finetuning", "lora"])

    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["base_model"] == f"{REPO}@v1"
    assert saved["base"]["commit"] == COMMIT and saved["base"]["repo"] == REPO and saved["base"]["revision"] == "v1"
    assert saved["world_size"] == 1
    entry = registry.load(registry.list_ids(runs)[0])
    assert entry.config["base"]["commit"] == COMMIT and entry.settings()["base.commit"] == COMMIT
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_compare_shows_the_revision_each_run_trained_on(tmp_path):
    from types import SimpleNamespace

    from molting.eval.report import settings_table

    persona = Persona.load(persona_dir(tmp_path))
    entries = []
    for commit in ("1" * 40, "2" * 40):
        record = SimpleNamespace(world_size=1, base={"source": "hub", "repo": REPO, "revision": None, "commit": commit})
        settings = registry.config_dict(**registry.training_settings(record))
        entries.append(registry.record(tmp_path / "runs", persona, "train", settings))
    table = settings_table([e.id for e in entries], [e.settings() for e in entries])
    assert f"| base.commit | {'1' * 40} | {'2' * 40} |" in table


def test_fit_and_load_backend_take_a_hub_id(offline_cache):
    from molting.backends import load_backend
    from molting.fit import load_shape

    shape = load_shape(REPO)
    assert shape.n_layer == 2 and shape.n_embd == 64
    backend = load_backend(REPO)
    try:
        assert backend.name == "transformers" and backend.count_tokens("Olá") > 0
    finally:
        backend.close()


# --- the four refusals: one line, exit 2, no traceback, nothing written -----------------------------


def _refused(tmp_path, base: str, cache: Path) -> str:
    """Run ``molting train --base base``; check the refusal's form and that nothing was written; its line."""
    from typer.testing import CliRunner

    from molting.cli import app

    persona = persona_dir(tmp_path)
    before = files_under(cache)
    out, runs = tmp_path / "run", tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", str(persona), "--base", base, "--out", str(out), "--runs", str(runs)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists() and not runs.exists() and files_under(cache) == before
    return lines[0]


def test_offline_and_not_cached_names_the_id_and_the_command_that_fetches_it(offline_cache, tmp_path):
    line = _refused(tmp_path, "other-org/absent@v2", offline_cache)
    assert "other-org/absent@v2 is neither a local directory nor in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set" in line
    assert "`hf download other-org/absent --revision v2`" in line


def test_a_repository_with_pickle_weights_only_is_refused(offline_cache, tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file

    source = tmp_path / "pickled"
    source.mkdir()
    for file in tiny_llama_dir.iterdir():
        if file.suffix != ".safetensors":
            (source / file.name).write_bytes(file.read_bytes())
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), source / "pytorch_model.bin")
    fill_hub_cache(offline_cache, "tiny-org/pickled", source)

    line = _refused(tmp_path, "tiny-org/pickled", offline_cache)
    assert f"tiny-org/pickled@{COMMIT[:12]} has only pickle weights (pytorch_model.bin)" in line
    assert "molting loads safetensors only" in line


def _raise(exc: Exception):
    def fake_snapshot_download(*args, **kwargs):
        raise exc

    return fake_snapshot_download


def _http_error(cls, status: int, message: str = "from the Hub"):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(message, response=response)


@pytest.fixture
def online(tmp_path, monkeypatch):
    """An empty cache, online as far as molting can tell, yet nothing can reach the Hub.

    ``snapshot_download`` fails the test unless the test patches it, and the endpoint is a
    closed local port, so an unpatched call errors at once instead of downloading.
    """
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.snapshot_download", _raise(AssertionError("unpatched: would reach the Hub")))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    (tmp_path / "hf-cache").mkdir()
    return tmp_path / "hf-cache"


def test_a_gated_repository_says_how_to_log_in(online, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", _raise(_http_error(errors.GatedRepoError, 403)))
    line = _refused(tmp_path, "meta-llama/Gated-1B", online)
    assert "meta-llama/Gated-1B is gated: accept its terms at https://huggingface.co/meta-llama/Gated-1B" in line
    assert "`hf auth login`" in line


def test_a_missing_repository_is_named(online, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", _raise(_http_error(errors.RepositoryNotFoundError, 404)))
    line = _refused(tmp_path, "nobody/nothing", online)
    assert "nobody/nothing: no such model on the Hugging Face Hub, nor a local directory" in line


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_http_error(errors.RevisionNotFoundError, 404), "org/name@v9: org/name has no revision 'v9'"),
        (errors.LocalEntryNotFoundError("no connection"), "the Hugging Face Hub cannot be reached"),
        (_http_error(errors.HfHubHTTPError, 401), "not authorised (HTTP 401); log in with `hf auth login`"),
        (_http_error(errors.HfHubHTTPError, 503), "the Hugging Face Hub answered HTTP 503"),
    ],
)
def test_other_hub_errors_become_one_line(online, monkeypatch, exc, expected):
    monkeypatch.setattr("huggingface_hub.snapshot_download", _raise(exc))
    with pytest.raises(HubError) as raised:
        resolve_base("org/name@v9")
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_the_download_asks_only_for_the_files_molting_reads(online, monkeypatch, tiny_llama_dir):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(fill_hub_cache(Path(kwargs["cache_dir"]), repo_id, tiny_llama_dir))

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_base("org/fetched").commit == COMMIT
    resolve_base("org/fetched")  # the same process asks the Hub once per id
    (repo, kwargs), = calls
    assert repo == "org/fetched" and kwargs["local_files_only"] is False and kwargs["tqdm_class"] is not None
    wanted = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja",
              "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    unwanted = ["pytorch_model.bin", "model.gguf", "onnx/model.onnx", "consolidated.safetensors", "README.md"]
    matches = lambda name: any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"])  # noqa: E731
    assert all(matches(name) for name in wanted) and not any(matches(name) for name in unwanted)


def test_the_environment_is_read_at_each_call(tmp_path, monkeypatch, tiny_llama_dir):
    """Set after huggingface_hub's import, HF_HUB_CACHE and HF_HUB_OFFLINE still apply (no network here)."""
    assert "huggingface_hub" in __import__("sys").modules
    for cache in (tmp_path / "a", tmp_path / "b"):
        fill_hub_cache(cache, REPO, tiny_llama_dir)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert resolve_base_model(REPO).is_relative_to(os.path.realpath(cache))
