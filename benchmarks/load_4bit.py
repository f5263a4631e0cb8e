"""Peak against steady memory of a 4-bit (NF4) load: molting's loader and transformers'.

Each way runs in a fresh Python process:

- ``molting``: ``TransformersBackend(dtype="4bit", loader="molting")``, tensor by tensor
  (molting.backends.nf4);
- ``transformers``: ``from_pretrained`` with a BitsAndBytesConfig (``loader="transformers"``);
- ``transformers-sync``: the same with ``HF_DEACTIVATE_ASYNC_LOAD=1``, transformers'
  documented switch against issue #43032.

On CUDA the figures are torch's allocator (``memory_allocated`` after the load,
``max_memory_allocated`` during it, both from ``Backend.memory()``). On CPU there is no
allocator peak, so a thread samples the process's anonymous resident memory
(``RssAnon`` of /proc/self/status, every 2 ms) above what it was before the load:
memory-mapped safetensors pages are file-backed and not counted, tensors materialized
in RAM are. The libraries a load imports lazily (bitsandbytes, accelerate, peft) are
imported first, and the workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (every
allocation over 128 KiB is its own mapping, given back when freed) and trim glibc's heap
before the steady figure, so that neither imports nor freed-but-kept heap count as the
model: without the fixed threshold, the CPU peaks of a 90M-parameter Llama read 48-122% higher. The ratio
peak / steady is what issue 13 bounds by 1.15 on a GPU.

Usage::

    python benchmarks/load_4bit.py [--model smollm2-135m|DIR] [--ways molting,transformers,transformers-sync]

Prints one JSON object per way.
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

WAYS = ("molting", "transformers", "transformers-sync")


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


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


def measure(model: str, way: str) -> dict:
    """Load ``model`` in 4-bit the ``way`` given, in this process; the memory figures in MiB."""
    import ctypes
    import gc

    import accelerate  # noqa: F401 - imported before the measurement, as are the next two
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch

    from molting.backends.transformers import TransformersBackend

    cuda = torch.cuda.is_available()
    before = _anon_mib()
    sampler = None if cuda else _AnonPeak()
    start = time.perf_counter()
    backend = TransformersBackend(model, dtype="4bit", loader="molting" if way == "molting" else "transformers")
    load_s = time.perf_counter() - start
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if cuda:
        memory = backend.memory()
        steady, peak, kind = memory.vram_mib, memory.peak_vram_mib, "vram (torch allocator)"
    else:
        peak, steady, kind = sampler.stop() - before, _anon_mib() - before, "cpu anonymous rss"
    import transformers

    return {
        "way": way,
        "model": model,
        "device": backend.device,
        "kind": kind,
        "load_s": round(load_s, 2),
        "steady_mib": round(steady, 1),
        "peak_mib": round(peak, 1),
        "peak_over_steady": round(peak / steady, 3),
        "transformers": transformers.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.model, args.worker)))
        return
    for way in args.ways.split(","):
        sync = "1" if way == "transformers-sync" else "0"
        env = dict(os.environ, HF_DEACTIVATE_ASYNC_LOAD=sync, MALLOC_MMAP_THRESHOLD_="131072")
        command = [sys.executable, __file__, "--model", args.model, "--worker", way]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
