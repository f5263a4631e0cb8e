"""Ctrl-C during training and during evaluation: nothing half-written is left, what is done is kept.

Each test runs the ``molting`` CLI in a subprocess on a tiny random model. The process sends
itself a real SIGINT from inside its own progress callback, at a chosen step: after the first
optimizer step of training, or at the first rubric answer of ``molting run``'s evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI with RichUI.bar wrapped: at the first advance of the bar whose title starts with
# argv[1], the process sends itself SIGINT (a KeyboardInterrupt at the next bytecode, inside the step).
SELF_INTERRUPT = """
import contextlib, os, signal, sys
import molting.cli as cli

target = sys.argv.pop(1)
bar = cli.RichUI.bar

@contextlib.contextmanager
def interrupting_bar(self, title, total):
    with bar(self, title, total) as advance:
        def step(done, total=None):
            advance(done, total)
            if title.startswith(target) and done >= 1:
                os.kill(os.getpid(), signal.SIGINT)
        yield step

cli.RichUI.bar = interrupting_bar
sys.argv[0] = "molting"
cli.main()
"""
PERSONA = {
    "name": "Ana",
    "language": "en",
    "identity": ["I am Ana, an assistant."],
    "traits": ["calm"],
    "train_system_prompt": "You are Ana.",
    "system_prompt": "You are Ana, a calm assistant.",
}
QUESTIONS = ["Where do you work?", "What do you like?", "How are you today?", "What is your favourite colour?"]


def make_persona(root: Path) -> Path:
    """A persona with 8 examples: 2 optimizer steps per epoch (batch 1 x accumulation 4)."""
    p = root / "ana"
    p.mkdir()
    (p / "persona.yaml").write_text(yaml.safe_dump(PERSONA), encoding="utf-8")
    lines = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"I am Ana ({i})."}]}
        for i, q in enumerate(QUESTIONS * 2)
    ]
    (p / "dataset.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return p


def molting(tmp_path: Path, *argv: str, interrupt_at: str | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "TMPDIR": str(tmp_path / "tmp"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    command = ["-c", SELF_INTERRUPT, interrupt_at] if interrupt_at else ["-m", "molting.cli"]
    return subprocess.run(
        [sys.executable, *command, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def training_options(tiny: Path) -> list[str]:
    options = {"--quantization": "none", "--finetuning": "lora", "--epochs": "2", "--max-length": "96"}
    return ["--base", str(tiny), *(x for pair in options.items() for x in pair)]


def leftovers(root: Path) -> list[str]:
    """Partial files and directories (``atomic_path``'s ``.NAME.partial-*``, ``.NAME.old-*``) under ``root``."""
    return [str(p) for p in root.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def test_sigint_between_training_steps_leaves_no_adapter_run_json_or_entry(tmp_path, tiny_llama_dir):
    persona = make_persona(tmp_path)
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = molting(
        tmp_path,
        "train", str(persona), "--out", str(out), "--runs", str(runs), *training_options(tiny_llama_dir),
        interrupt_at="training",
    )  # fmt: skip
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert "interrupted" in done.stderr
    assert not (out / "adapter").exists() and not (out / "run.json").exists()
    assert not runs.exists() or list(runs.iterdir()) == []
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the trainer's scratch directory went too


def test_sigint_during_evaluation_keeps_the_trained_adapter_and_says_how_to_resume(tmp_path, tiny_llama_dir):
    persona = make_persona(tmp_path)
    out, runs = tmp_path / "out", tmp_path / "runs"
    generation = ["--samples", "1", "--max-new-tokens", "8", "--quant", "F16", "--no-verify"]
    done = molting(
        tmp_path,
        "run", str(persona), "--out", str(out), "--runs", str(runs), *training_options(tiny_llama_dir), *generation,
        interrupt_at="rubric:",
    )  # fmt: skip
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert f"the trained weights are kept in {out / 'adapter'}" in message
    assert f"molting eval {persona} --model {out / 'adapter'}" in message
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (out / "run.json").is_file()
    assert not runs.exists() or list(runs.iterdir()) == []  # no registry entry for a run that did not finish
    assert not list(out.glob("*.gguf")) and not (out / "report.md").exists()
    assert leftovers(tmp_path) == []

    resumed = molting(tmp_path, "eval", str(persona), "--model", str(adapter), "--runs", str(runs), *generation[:4])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "registered:" in resumed.stdout and len(list(runs.iterdir())) == 1
