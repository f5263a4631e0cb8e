"""A corpus of hostile inputs, each run through the ``molting`` CLI in a process of its own.

Every case must end with exit code 2 and exactly one line on stderr, ``error: ...``, naming the
file or the field; no traceback; and nothing created or changed, neither in the case's own
directory nor outside the test's temporary directory (the worktree, ``$MOLTING_HOME``).

Cost: a fresh ``python -m molting.cli`` pays 3-5 s of imports, so the cases run as forks of one
warm process (``hostile_runner.py``): each still has its own exit code, stdout, stderr and crash.
``FRESH`` cases also run once as a plain ``python -m molting.cli`` subprocess, to keep the real
entry point honest. llama.cpp prints some native log lines on stderr itself (``llama_context:
...`` for a tiny model's short training context); those are the only other lines allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PERSONA = {
    "name": "Ana",
    "language": "en",
    "identity": ["I am Ana, an assistant."],
    "traits": ["calm"],
    "train_system_prompt": "You are Ana.",
    "system_prompt": "You are Ana, a calm assistant.",
}
EXAMPLE = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ana."}]}
NATIVE_LOG = ("llama_", "ggml_", "gguf_", "load", "print_info")  # llama.cpp's own stderr lines


# ---- builders: each writes a case into its directory ``d`` and returns (argv, [expected in the line])


def persona(d: Path, text: str | None = None, dataset: list | str | None = None, **files: str) -> Path:
    """A persona directory ``d/p``: persona.yaml (``text`` or the valid PERSONA), a dataset, extra files."""
    p = d / "p"
    p.mkdir()
    (p / "persona.yaml").write_text(
        text if text is not None else yaml.safe_dump(PERSONA, allow_unicode=True), encoding="utf-8"
    )
    lines = dataset if dataset is not None else [EXAMPLE]
    if isinstance(lines, str):
        (p / "dataset.jsonl").write_text(lines, encoding="utf-8")
    else:
        (p / "dataset.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    for name, content in files.items():
        (p / name.replace("_", ".")).write_text(content, encoding="utf-8")
    return p


def not_utf8(d: Path) -> list[str]:
    argv = validate(d)
    (d / "p" / "persona.yaml").write_bytes(b"name: \xff\xfe\n")
    return argv


def make_file(path: Path) -> None:
    path.write_text("x")


def spec(**changes) -> str:
    return yaml.safe_dump({**PERSONA, **changes}, allow_unicode=True)


def with_line(key: str, raw: str) -> str:
    """persona.yaml with ``key: <raw YAML>`` as written (for escapes such as a lone surrogate), last."""
    rest = yaml.safe_dump({k: v for k, v in PERSONA.items() if k != key}, allow_unicode=True)
    return f"{rest}{key}: {raw}\n"


def validate(d: Path, **kwargs) -> list[str]:
    return ["validate", str(persona(d, **kwargs))]


def eval_args(d: Path, *extra: str, **kwargs) -> list[str]:
    return ["eval", str(persona(d, **kwargs)), "--model", str(d / "none.gguf"), "--runs", str(d / "runs"), *extra]


def chat(d: Path, model: Path) -> list[str]:
    return ["chat", str(persona(d)), "hello", "--model", str(model)]


def gguf_header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return struct.pack("<4sIQQ", b"GGUF", version, n_tensors, n_kv)


def gguf_file(d: Path, data: bytes) -> Path:
    (d / "m.gguf").write_bytes(data)
    return d / "m.gguf"


def one_tensor(n_dims: int, shape: list[int]) -> bytes:
    name = b"w"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", n_dims)
    info += b"".join(struct.pack("<Q", n) for n in shape) + struct.pack("<IQ", 0, 0)  # F32, offset 0
    return gguf_header(n_tensors=1) + info + bytes(64)


def model_dir(d: Path, fx: dict, weights: bytes | None, index: dict | None = None) -> Path:
    m = d / "model"
    m.mkdir()
    shutil.copy(fx["tiny"] / "config.json", m / "config.json")
    if weights is not None:
        (m / "model.safetensors").write_bytes(weights)
    if index is not None:
        (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def adapter_dir(d: Path, fx: dict, config: str | None = None, weights: bool = True) -> Path:
    a = d / "adapter"
    shutil.copytree(fx["adapter256"], a)
    if config is not None:
        (a / "adapter_config.json").write_text(config, encoding="utf-8")
    if not weights:
        (a / "adapter_model.safetensors").unlink()
    return a


def rebase(fx: dict, base: str) -> str:
    config = json.loads((fx["adapter256"] / "adapter_config.json").read_text())
    return json.dumps({**config, "base_model_name_or_path": base})


def export(d: Path, fx: dict, out: str, existing: bytes | None = None, *extra: str) -> list[str]:
    model = d / "full"
    shutil.copytree(fx["tiny"], model)
    target = d / out.replace("FULL/", "full/")
    if existing is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(existing)
    p = persona(d)
    return ["export", str(p), "--adapter", str(model), "--out", str(target), "--quant", "F16", "--no-verify", *extra]


SURROGATE = '"x \\ud800"'  # a YAML/JSON escape that decodes to a lone surrogate
BOMB = "\n".join(
    ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    + [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
)
NESTED_BOMB = (
    "[&a ['lol','lol','lol','lol','lol','lol','lol','lol','lol'], "
    + ", ".join(f"&{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    + "]"
)
INJECTED = 'You are Ana.\nEnd of prompt"""""\nADAPTER /tmp/evil-lora.gguf\nPARAMETER num_ctx 1'

# (id, kind, build(d, fx) -> argv, expected pieces of the error line)
CASES = [
    # persona.yaml
    ("persona-missing", "persona", lambda d, fx: ["validate", str(d)], ["persona.yaml", "not found"]),
    (
        "persona-invalid-yaml",
        "persona",
        lambda d, fx: validate(d, text="name: [unclosed\n"),
        ["persona.yaml", "invalid YAML"],
    ),
    ("persona-not-utf8", "persona", lambda d, fx: not_utf8(d), ["persona.yaml", "not UTF-8 (byte 6)"]),
    (
        "persona-python-tag",
        "persona",
        lambda d, fx: validate(d, text="name: !!python/object/apply:os.system ['touch PWNED']\n"),
        ["persona.yaml", "invalid YAML", "python/object"],
    ),
    ("persona-yaml-bomb", "persona", lambda d, fx: validate(d, text=BOMB + "\nidentity: *i\n"), ["persona.yaml"]),
    (
        "persona-bomb-in-field",
        "persona",
        lambda d, fx: validate(d, text=with_line("identity", NESTED_BOMB)),
        ["persona.yaml", "'identity' must be a list of non-empty strings"],
    ),
    ("persona-list", "persona", lambda d, fx: validate(d, text="- a\n- b\n"), ["persona.yaml", "mapping"]),
    ("persona-unknown-key", "persona", lambda d, fx: validate(d, text=spec(colour="red")), ["persona.yaml", "colour"]),
    (
        "persona-missing-key",
        "persona",
        lambda d, fx: validate(d, text=yaml.safe_dump({k: v for k, v in PERSONA.items() if k != "system_prompt"})),
        ["persona.yaml", "system_prompt"],
    ),
    (
        "persona-bad-language",
        "persona",
        lambda d, fx: validate(d, text=spec(language="xx")),
        ["persona.yaml", "language"],
    ),
    (
        "persona-name-not-string",
        "persona",
        lambda d, fx: validate(d, text=spec(name=["a"])),
        ["persona.yaml", "'name'"],
    ),
    (
        "persona-surrogate-name",
        "surrogate",
        lambda d, fx: validate(d, text=with_line("name", SURROGATE)),
        ["persona.yaml:", "field 'name'", "lone surrogate U+D800"],
    ),
    (
        "persona-surrogate-identity",
        "surrogate",
        lambda d, fx: validate(d, text=with_line("identity", f"['ok', {SURROGATE}]")),
        ["persona.yaml:", "field 'identity[1]'", "lone surrogate"],
    ),
    (
        "persona-surrogate-prompt",
        "surrogate",
        lambda d, fx: validate(d, text=with_line("system_prompt", SURROGATE)),
        ["persona.yaml:", "field 'system_prompt'", "lone surrogate"],
    ),
    (
        "persona-name-1mb",
        "size",
        lambda d, fx: validate(d, text=spec(name="A" * 2**20)),
        ["persona.yaml", "'name' is 1048576 characters"],
    ),
    (
        "persona-alias-long",
        "size",
        lambda d, fx: validate(d, text=spec(aliases=["B" * 5000])),
        ["persona.yaml", "'aliases[0]'"],
    ),
    # dataset.jsonl
    (
        "dataset-invalid-json",
        "dataset",
        lambda d, fx: validate(d, dataset=json.dumps(EXAMPLE) + "\n{oops\n"),
        ["dataset.jsonl:2", "invalid JSON"],
    ),
    ("dataset-empty", "dataset", lambda d, fx: validate(d, dataset=""), ["dataset.jsonl", "no examples"]),
    ("dataset-not-object", "dataset", lambda d, fx: validate(d, dataset="[1, 2]\n"), ["dataset.jsonl:1", "messages"]),
    (
        "dataset-unknown-role",
        "dataset",
        lambda d, fx: validate(d, dataset=[{"messages": [{"role": "bot", "content": "x"}]}]),
        ["dataset.jsonl:1", "messages[0].role"],
    ),
    (
        "dataset-empty-content",
        "dataset",
        lambda d, fx: validate(d, dataset=[{"messages": [{"role": "user", "content": " "}, EXAMPLE["messages"][1]]}]),
        ["dataset.jsonl:1", "messages[0].content"],
    ),
    (
        "dataset-no-assistant",
        "dataset",
        lambda d, fx: validate(d, dataset=[{"messages": [EXAMPLE["messages"][0]]}]),
        ["dataset.jsonl:1", "no assistant"],
    ),
    (
        "dataset-late-system",
        "dataset",
        lambda d, fx: validate(d, dataset=[{"messages": [*EXAMPLE["messages"], {"role": "system", "content": "s"}]}]),
        ["dataset.jsonl:1", "messages[2].role", "system"],
    ),
    (
        "dataset-assistant-first",
        "order",
        lambda d, fx: validate(d, dataset=[{"messages": EXAMPLE["messages"][::-1]}]),
        ["dataset.jsonl:1", "messages[0].role", "assistant turn before any user turn"],
    ),
    (
        "dataset-two-users",
        "order",
        lambda d, fx: validate(d, dataset=[{"messages": [EXAMPLE["messages"][0], *EXAMPLE["messages"]]}]),
        ["dataset.jsonl:1", "messages[1].role", "two user turns in a row"],
    ),
    (
        "dataset-surrogate",
        "surrogate",
        lambda d, fx: validate(
            d,
            dataset='{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "x \\ud800"}]}\n',
        ),
        ["dataset.jsonl:1", "messages[1].content", "lone surrogate U+D800"],
    ),
    # preferences.jsonl, rubric.yaml, probes.yaml
    (
        "preferences-surrogate",
        "surrogate",
        lambda d, fx: validate(
            d,
            preferences_jsonl=(
                '{"prompt": [{"role": "user", "content": "hi"}], '
                '"chosen": [{"role": "assistant", "content": "\\udc80"}], '
                '"rejected": [{"role": "assistant", "content": "no"}]}\n'
            ),
        ),
        ["preferences.jsonl:1", "chosen[0].content", "lone surrogate U+DC80"],
    ),
    (
        "preferences-prompt-order",
        "dataset",
        lambda d, fx: validate(
            d,
            preferences_jsonl=(
                '{"prompt": [{"role": "assistant", "content": "hi"}], '
                '"chosen": [{"role": "assistant", "content": "a"}], '
                '"rejected": [{"role": "assistant", "content": "b"}]}\n'
            ),
        ),
        ["preferences.jsonl:1", "prompt[0].role"],
    ),
    (
        "rubric-invalid-yaml",
        "persona",
        lambda d, fx: eval_args(d, rubric_yaml="questions: [\n"),
        ["rubric.yaml", "invalid YAML"],
    ),
    (
        "rubric-surrogate",
        "surrogate",
        lambda d, fx: eval_args(d, rubric_yaml=f"questions:\n  - id: q\n    prompt: {SURROGATE}\n"),
        ["rubric.yaml:3", "questions[0].prompt", "lone surrogate"],
    ),
    (
        "probes-python-tag",
        "persona",
        lambda d, fx: eval_args(d, probes_yaml="probes: !!python/object:os.system {}\n"),
        ["probes.yaml", "invalid YAML"],
    ),
    (
        "probes-surrogate",
        "surrogate",
        lambda d, fx: eval_args(d, probes_yaml=f"probes:\n  - id: a\n    prompt: {SURROGATE}\n"),
        ["probes.yaml:3", "probes[0].prompt", "lone surrogate"],
    ),
    # GGUF files
    ("gguf-missing", "gguf", lambda d, fx: chat(d, d / "absent.gguf"), ["absent.gguf"]),
    ("gguf-empty", "gguf", lambda d, fx: chat(d, gguf_file(d, b"")), ["m.gguf", "truncated GGUF"]),
    (
        "gguf-text",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, b"just some text, not a model\n")),
        ["m.gguf", "not a GGUF file"],
    ),
    (
        "gguf-lfs-pointer",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")),
        ["m.gguf", "Git LFS pointer"],
    ),
    ("gguf-html", "gguf", lambda d, fx: chat(d, gguf_file(d, b"<!DOCTYPE html><html>404</html>")), ["m.gguf", "HTML"]),
    ("gguf-version", "gguf", lambda d, fx: chat(d, gguf_file(d, gguf_header(version=99))), ["m.gguf", "version 99"]),
    (
        "gguf-truncated",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, fx["gguf"].read_bytes()[:5000])),
        ["m.gguf", "truncated"],
    ),
    (
        "gguf-cut-data",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, fx["gguf"].read_bytes()[: fx["gguf"].stat().st_size - 4096])),
        ["m.gguf", "truncated GGUF"],
    ),
    (
        "gguf-absurd-tensor-count",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, gguf_header(n_tensors=2**62))),
        ["m.gguf", "runs past the end"],
    ),
    (
        "gguf-absurd-kv-count",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, gguf_header(n_kv=2**62))),
        ["m.gguf", "runs past the end"],
    ),
    (
        "gguf-absurd-dims",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, one_tensor(9, [1] * 9))),
        ["m.gguf", "9 dimensions"],
    ),
    (
        "gguf-absurd-shape",
        "gguf",
        lambda d, fx: chat(d, gguf_file(d, one_tensor(2, [2**40, 2**40]))),
        ["m.gguf", "truncated GGUF"],
    ),
    ("gguf-path-markup", "markup", lambda d, fx: chat(d, d / "[/x]m.gguf"), ["[/x]m.gguf", "file not found"]),
    (
        "gguf-template-escape",
        "template",
        lambda d, fx: chat(d, fx["evil"]),
        ["evil.gguf", "chat_template", "sandbox", "SecurityError"],
    ),
    # safetensors model directories
    (
        "safetensors-no-weights",
        "safetensors",
        lambda d, fx: chat(d, model_dir(d, fx, None)),
        ["model", "no model weights"],
    ),
    (
        "safetensors-empty",
        "safetensors",
        lambda d, fx: chat(d, model_dir(d, fx, b"")),
        ["model.safetensors", "truncated safetensors"],
    ),
    (
        "safetensors-huge-header",
        "safetensors",
        lambda d, fx: chat(d, model_dir(d, fx, struct.pack("<Q", 2**60))),
        ["model.safetensors", "truncated safetensors"],
    ),
    (
        "safetensors-garbage-header",
        "safetensors",
        lambda d, fx: chat(d, model_dir(d, fx, safetensors(b"{not json"))),
        ["model.safetensors", "corrupt safetensors header"],
    ),
    (
        "safetensors-cut-data",
        "safetensors",
        lambda d, fx: chat(
            d, model_dir(d, fx, safetensors(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'))
        ),
        ["model.safetensors", "truncated safetensors"],
    ),
    (
        "safetensors-missing-shard",
        "safetensors",
        lambda d, fx: chat(d, model_dir(d, fx, safetensors(b"{}"), {"weight_map": {"w": "model-2.safetensors"}})),
        ["model.safetensors.index.json", "missing shard"],
    ),
    # adapters, through load_backend
    (
        "adapter-invalid-json",
        "adapter",
        lambda d, fx: chat(d, adapter_dir(d, fx, "{not json")),
        ["adapter_config.json", "invalid JSON"],
    ),
    (
        "adapter-not-object",
        "adapter",
        lambda d, fx: chat(d, adapter_dir(d, fx, "[]")),
        ["adapter_config.json", "JSON object"],
    ),
    (
        "adapter-other-base",
        "adapter",
        lambda d, fx: chat(d, adapter_dir(d, fx, rebase(fx, str(fx["tiny"])))),
        ["adapter", "lora_A", "does not fit"],
    ),
    (
        "adapter-unknown-base",
        "adapter",
        lambda d, fx: chat(d, adapter_dir(d, fx, rebase(fx, "someone/no-such-model"))),
        ["adapter_config.json", "no-such-model"],
    ),
    (
        "adapter-no-weights",
        "adapter",
        lambda d, fx: chat(d, adapter_dir(d, fx, weights=False)),
        ["adapter", "no adapter weights"],
    ),
    # outputs: export --out, --runs, eval --out
    (
        "export-out-own-weights",
        "output",
        lambda d, fx: export(d, fx, "FULL/model.safetensors"),
        ["model.safetensors", "inside the input directory"],
    ),
    (
        "export-out-unrelated-file",
        "output",
        lambda d, fx: export(d, fx, "notes.txt", b"my notes"),
        ["notes.txt", "not a GGUF file"],
    ),
    (
        "export-out-existing-gguf",
        "output",
        lambda d, fx: export(d, fx, "old.gguf", b"GGUF" + bytes(60)),
        ["old.gguf", "--force"],
    ),
    (
        "export-out-directory",
        "output",
        lambda d, fx: (d / "outdir").mkdir() or export(d, fx, "outdir"),
        ["outdir", "is a directory"],
    ),
    (
        "export-out-under-file",
        "output",
        lambda d, fx: make_file(d / "afile") or export(d, fx, "afile/m.gguf"),
        ["afile", "not a directory"],
    ),
    (
        "export-out-markup",
        "markup",
        lambda d, fx: export(d, fx, "out/[/x].gguf", b"[bold]not gguf"),
        ["[/x].gguf", "not a GGUF file"],
    ),
    (
        "eval-runs-under-file",
        "output",
        lambda d, fx: make_file(d / "afile") or [*eval_args(d)[:-2], "--runs", str(d / "afile" / "runs")],
        ["afile", "--runs", "not a directory"],
    ),
    (
        "eval-runs-read-only",  # /sys refuses new files even to root, where chmod 555 would not
        "output",
        lambda d, fx: [*eval_args(d)[:-2], "--runs", "/sys/molting-hostile-runs"],
        ["/sys/molting-hostile-runs", "--runs is not writable"],
    ),
    (
        "eval-out-directory",
        "output",
        lambda d, fx: (d / "outdir").mkdir() or eval_args(d, "--out", str(d / "outdir")),
        ["outdir", "is a directory"],
    ),
    (
        "train-runs-under-file",
        "output",
        lambda d, fx: (
            make_file(d / "afile")
            or [
                "train",
                str(persona(d)),
                "--base",
                str(fx["tiny"]),
                "--runs",
                str(d / "afile" / "r"),
                "--out",
                str(d / "o"),
            ]
        ),
        ["afile", "--runs", "not a directory"],
    ),
    # the Ollama Modelfile
    (
        "run-modelfile-injection",
        "modelfile",
        lambda d, fx: [
            "run",
            str(persona(d, text=spec(system_prompt=INJECTED))),
            "--base",
            str(fx["tiny"]),
            "--out",
            str(d / "o"),
            "--runs",
            str(d / "runs"),
        ],
        ["persona.yaml", "system_prompt", "Ollama Modelfile", "line 2"],
    ),
]
FRESH = {"persona-surrogate-name", "export-out-markup", "gguf-template-escape"}


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def listing(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*")} if root.exists() else {}


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_llama_dir, tiny_llama_256_dir) -> dict:
    """Models the cases copy from: a tiny model, an adapter of a wider one, a GGUF, one with an evil template."""
    from molting.export import write_gguf
    from tests.test_merge import make_adapter

    root = tmp_path_factory.mktemp("hostile-shared")
    make_adapter(tiny_llama_256_dir, root / "adapter256")
    evil_dir = shutil.copytree(tiny_llama_dir, root / "evil-model")
    (evil_dir / "chat_template.jinja").write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    return {
        "tiny": tiny_llama_dir,
        "adapter256": root / "adapter256",
        "gguf": write_gguf(tiny_llama_dir, root / "tiny.gguf"),
        "evil": write_gguf(evil_dir, root / "evil.gguf"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared) -> dict:
    """Build every case, run them all in one warm runner, return results and before/after snapshots."""
    root = tmp_path_factory.mktemp("hostile")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "MOLTING_HOME": os.environ.get("MOLTING_HOME", str(Path.home() / ".cache" / "molting")),
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "TRANSFORMERS_VERBOSITY": "error",
        "COLUMNS": "200",
    }
    for name in ("home", "tmp"):
        (root / name).mkdir()
    cases, before = [], {}
    for case_id, _, build, _ in CASES:
        d = root / case_id
        d.mkdir()
        argv = build(d, shared)
        cases.append({"argv": argv, "cwd": str(d)})
        before[case_id] = snapshot(d)
    outside = (git_status(), listing(Path(env["MOLTING_HOME"])), snapshot(shared["adapter256"].parent))
    (root / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    runner = [sys.executable, str(REPO / "tests" / "hostile_runner.py"), str(root / "cases.json"), str(root / "r.json")]
    subprocess.run(runner, env=env, check=True, timeout=600)
    results = json.loads((root / "r.json").read_text(encoding="utf-8"))
    fresh = {}
    for i, (case_id, *_) in enumerate(CASES):
        if case_id in FRESH:
            done = subprocess.run(
                [sys.executable, "-m", "molting.cli", *cases[i]["argv"]],
                cwd=cases[i]["cwd"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            fresh[case_id] = {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    after_outside = (git_status(), listing(Path(env["MOLTING_HOME"])), snapshot(shared["adapter256"].parent))
    return {
        "root": root,
        "results": dict(zip([c[0] for c in CASES], results, strict=True)),
        "fresh": fresh,
        "before": before,
        "outside": (outside, after_outside),
    }


def check_one_line(result: dict, expected: list[str]) -> None:
    everything = result["stdout"] + result["stderr"]
    assert "Traceback" not in everything, everything[-3000:]
    lines = [line for line in result["stderr"].splitlines() if line.strip() and not line.startswith(NATIVE_LOG)]
    assert result["code"] == 2, (result["code"], everything[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for piece in expected:
        assert piece in lines[0], (piece, lines[0][:500])


@pytest.mark.parametrize(("case_id", "expected"), [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(corpus, case_id, expected):
    result = corpus["results"][case_id]
    check_one_line(result, expected)
    d = corpus["root"] / case_id
    assert snapshot(d) == corpus["before"][case_id], "the failed command created or changed files in its directory"


@pytest.mark.parametrize("case_id", sorted(FRESH))
def test_fresh_process_gives_the_same_line(corpus, case_id):
    expected = next(c[3] for c in CASES if c[0] == case_id)
    check_one_line(corpus["fresh"][case_id], expected)


def test_nothing_outside_the_temporary_directory_changed(corpus):
    before, after = corpus["outside"]
    assert before == after
    assert list((corpus["root"] / "tmp").iterdir()) == []


def test_corpus_covers_every_kind():
    kinds = Counter(kind for _, kind, _, _ in CASES)
    assert set(kinds) >= {
        "persona",
        "dataset",
        "order",
        "surrogate",
        "size",
        "gguf",
        "template",
        "safetensors",
        "adapter",
        "output",
        "markup",
        "modelfile",
    }
    assert sum(kinds.values()) >= 60
