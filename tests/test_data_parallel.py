"""`molting train` data-parallel under `accelerate launch`: two CPU processes on the gloo backend.

``--multi_gpu`` is accelerate's launcher for several processes on one machine (torchrun); with no
GPU visible each process trains on the CPU and DDP reduces gradients over gloo. (``--cpu`` would
start one process only: accelerate's CPU launcher spreads over processes through mpirun alone.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from molting import registry
from tests.test_pipeline import make_persona

EXAMPLES = 16  # one process: 16 / (1 x 4 accumulation) = 4 steps an epoch; two processes: 2 each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_only_the_main_one_writes(tiny_llama_dir, tmp_path):
    persona = tmp_path / "persona"
    persona.mkdir()
    make_persona(persona)
    turns = [({"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": f"Resposta {i}."})
             for i in range(EXAMPLES)]
    rows = [{"messages": list(pair)} for pair in turns]
    (persona / "dataset.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out, runs = tmp_path / "run", tmp_path / "runs"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    train = ["-m", "molting.cli", "train", str(persona), "--base", str(tiny_llama_dir), "--out", str(out)]
    train += ["--runs", str(runs), "--epochs", "1", "--r", "2", "--lora-alpha", "4", "--finetuning", "lora"]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])

    done = subprocess.run(launch + train, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    # Each process trained on half the examples: two optimizer steps, not one process's four.
    assert [entry["step"] for entry in record["loss"]] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "budget.json", "run.json"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    (entry,) = [registry.load(path) for path in registry.list_ids(runs)]
    assert entry.config["world_size"] == 2 and sorted(p.name for p in runs.iterdir()) == [entry.id]
    assert done.stdout.count("registered:") == 1


def test_molting_run_refuses_a_multi_process_launch(monkeypatch, tmp_path):
    from molting.errors import ConfigError
    from molting.pipeline import RunConfig, run

    (tmp_path / "persona").mkdir()
    persona = make_persona(tmp_path / "persona")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="molting run works in one process"):
        run(persona, RunConfig(out=tmp_path / "run"), ui=None)
    assert not (tmp_path / "run").exists()
