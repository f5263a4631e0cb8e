"""The training memory planner against measured peaks, on the CPU.

Each row trains ``molting.train.train`` for ``--steps`` optimizer steps (batch 1, no
accumulation) in a fresh Python process, on examples whose answers fill ``max_length``
tokens. On the CPU the measurement is the kernel's peak resident set (``VmHWM``, reset by
writing 5 to ``/proc/self/clear_refs`` once the libraries are imported and before the model
loads) less the resident set at that moment: anonymous memory and file-backed pages alike,
because transformers memory-maps a safetensors file whose dtype is the one asked (the
embedded SmolLM2's fp32 weights are then file pages, never anonymous memory, yet resident all
along the run). The anonymous part alone (``RssAnon``, sampled every 2 ms by a thread) is
reported beside it. The workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` so that large
tensors are their own mappings, given back to the system when freed (as in
``load_4bit.py``). Beside each measurement: ``molting.fit_train``'s CPU estimate
(``device="cpu"``) and its error, and its CUDA estimate for the same setup. On a CUDA machine
(``gpu_check.py``) the measurement is torch's ``max_memory_allocated`` from the first step
(``molting.train`` resets it after loading) and ``max_memory_reserved``, and the error is
against the CUDA estimate's tensors.

Models: the embedded SmolLM2-135M, and random-weight models with the exact configurations of
TinyLlama-1.1B and Phi-3-mini-4k (``molting.bench.models.random_model_dir``, built once into
``--cache``).

Usage::

    python benchmarks/train_memory.py --rows smollm2-135m:lora:512 tinyllama-1.1b:qlora:512 ...
    python benchmarks/train_memory.py --report benchmarks/train_memory.jsonl   # the markdown table

A row is ``MODEL:FINETUNING:MAX_LENGTH[:ckpt|:nockpt]`` (default checkpointing: molting's,
on for QLoRA). Every row prints one JSON line; ``--out`` appends them to a JSONL file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("MOLTING_BENCH_CACHE", "/tmp/molting-bench-cache"))
ANSWER = "Sou o Cláudio, uma inteligência artificial curiosa e direta, e conto histórias de 1999. "


def _status_mib(key: str = "RssAnon") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _anon_mib() -> float:
    return _status_mib("RssAnon")


class _AnonPeak:
    """Samples RssAnon in a thread; ``peak`` is the highest value seen, in MiB."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self.done = interval_s, _anon_mib(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _anon_mib())
            time.sleep(self.interval_s)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, _anon_mib())


def parse_row(text: str) -> dict:
    """``MODEL:FINETUNING:MAX_LENGTH[:ckpt|:nockpt]`` as a dict."""
    parts = text.split(":")
    checkpointing = {"ckpt": True, "nockpt": False}[parts[3]] if len(parts) > 3 else None
    return {"model": parts[0], "finetuning": parts[1], "max_length": int(parts[2]), "checkpointing": checkpointing}


def _persona(n: int, max_length: int):
    from molting.persona import Persona

    persona = Persona(name="Cláudio", language="pt", identity=["Sou o Cláudio."], traits=["curioso"],
                      train_system_prompt="Você é o Cláudio.", system_prompt="Você é o Cláudio.")
    answer = ANSWER * (8 * max_length // len(ANSWER) + 1)  # longer than max_length tokens: truncated to it
    persona.examples = [[{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": answer}]
                        for i in range(n)]
    return persona


def measure(row: dict, steps: int, r: int) -> dict:
    """Train ``row`` for ``steps`` steps in this process; the measured peak beside the estimates (MiB)."""
    import tempfile

    import bitsandbytes  # noqa: F401 - imported before the baseline, as are the next ones
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401

    from molting.bench.models import model_dir
    from molting.fit import MIB, load_shape
    from molting.fit_train import TrainSetup, estimate_training
    from molting.train import TrainConfig, train

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(2)
    base = model_dir(row["model"], CACHE)
    config = TrainConfig(
        base_model=str(base), finetuning="full" if row["finetuning"] == "full" else "lora",
        quantization="4bit" if row["finetuning"] == "qlora" else "none", r=r, lora_alpha=2 * r,
        max_length=row["max_length"], num_train_epochs=1, gradient_accumulation_steps=1,
        checkpointing=row["checkpointing"], learning_rate=1e-4,
    )
    persona = _persona(steps, row["max_length"])
    before, rss_before = _anon_mib(), _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    sampler = _AnonPeak()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        record = train(persona, out, config)  # on CUDA it resets the allocator's peak after loading
    peak = sampler.stop() - before
    hwm = _status_mib("VmHWM") - rss_before  # anonymous and file-backed: memory-mapped fp32 weights count
    setup = TrainSetup(row["finetuning"], r, row["max_length"], 1, row["checkpointing"], "cpu")
    shape = load_shape(base)
    cpu = estimate_training(shape, setup)
    gpu = estimate_training(shape, TrainSetup(row["finetuning"], r, row["max_length"], 1, row["checkpointing"]))
    measured, estimate = (record.peak_memory_mb, gpu.allocated / MIB) if cuda else (hwm, cpu.total / MIB)
    return {
        **row, "r": r, "checkpointing": setup.ckpt, "steps": len(record.loss),
        "seconds": round(time.perf_counter() - start, 1), "device": "cuda" if cuda else "cpu",
        "measured_mib": round(measured, 1), "anon_peak_mib": round(peak, 1),
        "estimate_cpu_mib": round(cpu.total / MIB, 1),
        "error": round(estimate / measured - 1, 3),
        "reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1) if cuda else None,
        "terms_cpu_mib": {name: round(size / MIB, 1) for name, size in cpu.rows()},
        "estimate_cuda_allocated_mib": round(gpu.allocated / MIB, 1),
        "estimate_cuda_total_mib": round(gpu.total / MIB, 1),
        "loss": [e["loss"] for e in record.loss], "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg()[0],
    }


def estimates(row: dict, r: int) -> tuple[float, float, float]:
    """The planner's (CPU total, CUDA allocated, CUDA total) for ``row``, in MiB, by the current planner."""
    from molting.fit import MIB, load_shape
    from molting.fit_train import TrainSetup, estimate_training

    shape = load_shape(row["model"])  # the exact configuration: the random models have it too
    setup = TrainSetup(row["finetuning"], r, row["max_length"], 1, row["checkpointing"], "cpu")
    cpu = estimate_training(shape, setup)
    gpu = estimate_training(shape, TrainSetup(row["finetuning"], r, row["max_length"], 1, row["checkpointing"]))
    return cpu.total / MIB, gpu.allocated / MIB, gpu.total / MIB


def report(path: Path) -> str:
    """The markdown table of a JSONL file of rows, the estimates recomputed by the current planner."""
    lines = [
        "| model | fine-tuning | r | max_length | checkpointing | steps | s | measured (MiB) | anonymous (MiB) "
        "| CPU estimate (MiB) | error | CUDA estimate: allocated / with context (MiB) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for line in path.read_text().splitlines():
        x = json.loads(line)
        cpu, allocated, total = estimates(x, x["r"])
        lines.append(
            f"| {x['model']} | {x['finetuning']} | {x['r']} | {x['max_length']} "
            f"| {'on' if x['checkpointing'] else 'off'} | {x['steps']} | {x['seconds']:.0f} "
            f"| {x['measured_mib']:.0f} | {x['anon_peak_mib']:.0f} | {cpu:.0f} | {cpu / x['measured_mib'] - 1:+.1%} "
            f"| {allocated:.0f} / {total:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=["smollm2-135m:lora:512"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--out", type=Path, help="append each row's JSON line here")
    parser.add_argument("--report", type=Path, help="print the markdown table of this JSONL file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.worker:
        print(json.dumps(measure(parse_row(args.worker), args.steps, args.r), ensure_ascii=False))
        return
    for row in args.rows:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, __file__, "--worker", row, "--steps", str(args.steps), "--r", str(args.r)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(json.dumps({"row": row, "failed": result.stderr.strip().splitlines()[-3:]}), flush=True)
            continue
        line = result.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
