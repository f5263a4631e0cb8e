"""One prepared GPU check for issue 21, meant to finish within 10 minutes on one GPU.

On a random-weight Phi-3-mini-4k with the exact configuration (built once into ``--cache``):

1. QLoRA r=16 at max_length 512 for 20 steps through ``molting.train`` (``train_memory.py``'s
   worker): ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` beside the
   training planner's CUDA estimate (``molting.fit_train``);
2. a 4-bit load with molting's loader and with transformers' (``load_4bit.py``): peak against
   steady allocated memory, on the installed transformers;
3. llama.cpp (``molting.bench``'s raw engine) on its Q4_K_M GGUF with every layer offloaded,
   at n_ctx 2048 and 4096: peak VRAM (NVML) and decode tokens/s, against the card's memory
   bandwidth (NVML's memory clock x bus width): decode reads every weight once per token, so
   bandwidth / GGUF size bounds tokens/s.

Writes ``--out`` ``.json`` and ``.md`` (default ``benchmarks/reports/gpu_check``). Without a
CUDA GPU it prints one line saying so and exits 0.

Usage::

    python benchmarks/gpu_check.py [--cache DIR] [--out PATH] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "phi-3-mini"


def no_gpu_line() -> str | None:
    """The line to print when there is no CUDA GPU; None when there is one."""
    import torch

    if torch.cuda.is_available():
        return None
    return "gpu_check: no CUDA GPU on this machine; nothing measured (run it on a machine with one)"


def qlora_steps(cache: Path, steps: int = 20) -> dict:
    """``train_memory.py``'s worker on the GPU: QLoRA r=16, max_length 512, ``steps`` steps."""
    env = dict(os.environ, MOLTING_BENCH_CACHE=str(cache))
    command = [sys.executable, str(HERE / "train_memory.py"), "--worker", f"{MODEL}:qlora:512", "--steps", str(steps)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_peaks(model_dir: Path) -> list[dict]:
    """``load_4bit.py`` for molting's loader and transformers' (async and synchronous)."""
    command = [sys.executable, str(HERE / "load_4bit.py"), "--model", str(model_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def bandwidth_gb_s() -> float | None:
    """Peak memory bandwidth from NVML: 2 transfers per memory clock x bus width; None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    return 2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9


def llamacpp_offloaded(cache: Path) -> dict:
    """Raw llama.cpp on the Q4_K_M GGUF, every layer on the GPU, at n_ctx 2048 and 4096."""
    import llama_cpp

    from molting.bench import run_job
    from molting.bench.measure import Job
    from molting.bench.models import gguf_file

    if not llama_cpp.llama_supports_gpu_offload():
        return {"skipped": "llama-cpp-python was built without GPU offload (CMAKE_ARGS=-DGGML_CUDA=on to build it)"}
    gguf = gguf_file(MODEL, "Q4_K_M", cache)
    bandwidth = bandwidth_gb_s()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_ctx in (2048, 4096):
            job = Job(engine="llama.cpp raw", model=str(gguf), n_ctx=n_ctx, n_gpu_layers=-1, n_prompt=512, n_new=128)
            run = run_job(job, Path(tmp))
            bound = bandwidth * 1e9 / gguf.stat().st_size if bandwidth else None
            rows.append({
                "n_ctx": n_ctx, "peak_vram_mib": run.peak_vram_mib, "decode_tok_s": run.decode_tok_s,
                "prefill_tok_s": run.prefill_tok_s, "bandwidth_bound_tok_s": bound,
                "share_of_bound": run.decode_tok_s / bound if bound and run.decode_tok_s else None,
            })
    return {"gguf": str(gguf), "gguf_mib": gguf.stat().st_size / 2**20, "bandwidth_gb_s": bandwidth, "rows": rows}


def markdown(result: dict) -> str:
    """The figures as markdown."""
    q = result["qlora"]
    lines = [
        f"# GPU check ({result['device']}, {result['date']})", "",
        "## QLoRA r=16, max_length 512, random Phi-3-mini-4k", "",
        f"- {q['steps']} steps in {q['seconds']} s; max_memory_allocated {q['measured_mib']:.0f} MiB, "
        f"max_memory_reserved {q.get('reserved_mib', float('nan')):.0f} MiB",
        f"- planner: allocated {q['estimate_cuda_allocated_mib']:.0f} MiB ({q['error']:+.1%}), "
        f"with context and reserve {q['estimate_cuda_total_mib']:.0f} MiB", "",
        "## 4-bit load: peak against steady", "",
        "| loader | load (s) | steady (MiB) | peak (MiB) | peak / steady |", "|---|---:|---:|---:|---:|",
    ]
    for row in result["load"]:
        cells = (row["way"], row["load_s"], row["steady_mib"], row["peak_mib"], row["peak_over_steady"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    llama = result["llamacpp"]
    lines += ["", "## llama.cpp Q4_K_M, every layer offloaded", ""]
    if "skipped" in llama:
        lines.append(f"not measured: {llama['skipped']}")
        return "\n".join(lines) + "\n"
    lines += [
        f"GGUF {llama['gguf_mib']:.0f} MiB; memory bandwidth {llama['bandwidth_gb_s']} GB/s", "",
        "| n_ctx | peak VRAM (MiB) | decode (tok/s) | bandwidth bound (tok/s) | share |", "|---:|---:|---:|---:|---:|",
    ]
    for r in llama["rows"]:
        share = f"{r['share_of_bound']:.0%}" if r["share_of_bound"] else "—"
        cells = (r["n_ctx"], r["peak_vram_mib"], f"{r['decode_tok_s']:.1f}", r["bandwidth_bound_tok_s"], share)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_cache = Path(os.environ.get("MOLTING_BENCH_CACHE", "/tmp/molting-bench-cache"))
    parser.add_argument("--cache", type=Path, default=default_cache)
    parser.add_argument("--out", type=Path, default=HERE / "reports" / "gpu_check")
    parser.add_argument("--skip-llamacpp", action="store_true")
    args = parser.parse_args()
    line = no_gpu_line()
    if line:
        print(line)
        return 0
    import torch

    from molting.bench.models import random_model_dir

    start = time.perf_counter()
    model_dir = random_model_dir(MODEL, args.cache)
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["qlora"] = qlora_steps(args.cache)
    result["load"] = load_peaks(model_dir)
    result["llamacpp"] = {"skipped": "--skip-llamacpp"} if args.skip_llamacpp else llamacpp_offloaded(args.cache)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
