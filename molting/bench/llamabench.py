"""llama.cpp's own ``llama-bench`` as the reference ``molting bench`` compares itself with.

``make llama-bench`` (``scripts/build-llama-tools.sh llama-bench``) builds it from the source
distribution of the installed llama-cpp-python, with the CMake flags the Python package was
built with, into ``<venv>/llama.cpp/bin``. :func:`tool_path` finds it there, then on ``PATH``.

molting measures prefill from an empty context (``n_prompt`` tokens, then the first token)
and decode right after that prompt, so its decode runs at depth ``n_prompt``. The matching
llama-bench figures are ``pp<n_prompt>`` at depth 0 and ``tg<n_new>`` at depth ``n_prompt``
(``-d``); :func:`run` asks for depths 0 and ``n_prompt`` and returns all four.
Source of the flags and JSON fields: ``tools/llama-bench/llama-bench.cpp`` in llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TOOL = "llama-bench"


def tool_path(name: str = TOOL) -> Path | None:
    """A llama.cpp program: ``<sys.prefix>/llama.cpp/bin/<name>``, else ``name`` on ``PATH``; None if neither."""
    local = Path(sys.prefix) / "llama.cpp" / "bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class Settings:
    """One llama-bench invocation, in molting bench's terms.

    Attributes:
        n_prompt: prompt tokens (``-p``); also the decode depth (``-d 0,n_prompt``).
        n_new: generated tokens (``-n``).
        threads: CPU threads (``-t``), for prompt and generation alike.
        n_gpu_layers: ``-ngl`` (llama-bench's default is every layer; molting's 0).
        flash_attn: ``-fa 1`` or ``-fa 0``.
        repack: ``--repack 1/0`` (llama.cpp's extra CPU buffer types).
        n_batch: ``-b`` and ``-ub`` (molting's backend evaluates 512 prompt tokens a step).
        repeats: ``-r``.
    """

    n_prompt: int
    n_new: int
    threads: int
    n_gpu_layers: int = 0
    flash_attn: bool = True
    repack: bool = True
    n_batch: int = 512
    repeats: int = 3

    def arguments(self, gguf: Path) -> list[str]:
        """llama-bench's command-line arguments (JSON output) for ``gguf``."""
        return [
            *("-m", str(gguf), "-p", str(self.n_prompt), "-n", str(self.n_new)),
            *("-d", f"0,{self.n_prompt}", "-t", str(self.threads), "-ngl", str(self.n_gpu_layers)),
            *("-fa", "1" if self.flash_attn else "0", "--repack", "1" if self.repack else "0"),
            *("-b", str(self.n_batch), "-ub", str(self.n_batch), "-r", str(self.repeats), "-o", "json"),
        ]


@dataclass(frozen=True)
class Result:
    """One llama-bench test: ``pp`` (prompt) or ``tg`` (generation) of ``n`` tokens at ``depth``.

    Attributes:
        test: ``"pp"`` or ``"tg"``.
        n: tokens processed or generated.
        depth: tokens already in the context (``-d``).
        tok_s: mean tokens/s over the repetitions (llama-bench's ``avg_ts``).
        stddev: their standard deviation (``stddev_ts``).
        samples: every repetition's tokens/s (``samples_ts``), when llama-bench reports them.
    """

    test: str
    n: int
    depth: int
    tok_s: float
    stddev: float
    samples: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.test}{self.n} @ d{self.depth}"


def parse(output: str) -> tuple[list[Result], dict]:
    """llama-bench's ``-o json`` output as Results and the first record's build facts.

    Raises:
        ValueError: not llama-bench's JSON list of tests.
    """
    records = json.loads(output)
    if not isinstance(records, list) or not records:
        raise ValueError("llama-bench printed no test results")
    results = []
    for r in records:
        test, n = ("pp", r["n_prompt"]) if r["n_gen"] == 0 else ("tg", r["n_gen"])
        samples = tuple(float(s) for s in r.get("samples_ts", ()))
        depth, tok_s, stddev = int(r.get("n_depth", 0)), float(r["avg_ts"]), float(r["stddev_ts"])
        results.append(Result(test, int(n), depth, tok_s, stddev, samples))
    first = records[0]
    facts = {k: first[k] for k in ("build_commit", "cpu_info", "backends", "n_threads", "flash_attn") if k in first}
    return results, facts


def run(binary: Path, gguf: Path, settings: Settings) -> tuple[list[Result], dict]:
    """Run llama-bench on ``gguf``; its Results and build facts (see :func:`parse`).

    Raises:
        subprocess.CalledProcessError: llama-bench failed (a SIGILL shows as status -4).
    """
    command = [str(binary), *settings.arguments(gguf)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return parse(done.stdout)


def find(results: list[Result], test: str, n: int, depth: int) -> Result | None:
    """The result of ``test`` (``pp``/``tg``) of ``n`` tokens at ``depth``; None if llama-bench did not run it."""
    return next((r for r in results if (r.test, r.n, r.depth) == (test, n, depth)), None)
