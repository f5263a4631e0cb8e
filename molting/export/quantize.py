"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

The quantization types are llama.cpp's ``LLAMA_FTYPE_MOSTLY_*`` file types
(``include/llama.h``); block layouts are ggml's (``ggml/src/ggml-quants.c``).
K-quants (``*_K*``) quantize rows in super-blocks of 256 values; llama.cpp falls back
to another type for tensors whose rows are not a multiple of 256 (SmolLM2-135M's 576:
Q4_K_M then stores most matrices as q5_0 and q8_0). molting reads llama.cpp's log
while quantizing and reports those fallbacks in one line instead of one per tensor.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from molting.errors import ExportError
from molting.io import atomic_path

logger = logging.getLogger(__name__)

# ggml's log levels (ggml/include/ggml.h, enum ggml_log_level). llama-cpp-python 0.3.x maps
# them with an older enum: its default handler prints warnings as errors and hides errors.
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

# llama.cpp's line per tensor (src/llama-quant.cpp): "[  12/ 272] blk.1.attn_q.weight - ..."
_TENSOR_LINE = re.compile(r"^\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")
_FALLBACK = re.compile(
    r"ncols\s+(?P<ncols>\d+) not divisible by (?P<block>\d+) \(required for type\s+(?P<wanted>\w+)\)"
    r"\s*-> falling back to\s+(?P<used>\w+)"
)

# name -> llama_cpp attribute holding the llama_ftype value
QUANT_TYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


def quantize(
    in_path: str | Path,
    out_path: str | Path,
    qtype: str = "Q4_K_M",
    *,
    n_threads: int = 0,
    verbose: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Quantize ``in_path`` (an F32/F16 GGUF) to ``out_path`` with llama.cpp.

    Args:
        in_path: source GGUF, usually ``write_gguf``'s F16 or F32 output.
        out_path: destination ``.gguf``; written to a temporary sibling, then renamed.
        qtype: a key of ``QUANT_TYPES`` (case-insensitive), e.g. ``"Q4_K_M"``.
        n_threads: quantization threads; 0 lets llama.cpp use all cores.
        verbose: print llama.cpp's whole log (every tensor). Otherwise tensors that fell
            back to another type are summed up in one warning on the ``molting.export.quantize``
            logger, and llama.cpp's errors go into the ExportError.
        progress: called as ``progress(done, total)`` as llama.cpp starts each tensor (from its log).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ExportError: unknown ``qtype``, missing input, or llama.cpp reports failure.
    """
    import llama_cpp

    name = qtype.upper()
    if name not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {qtype!r}; allowed: {list(QUANT_TYPES)}")
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise ExportError(f"{in_path}: GGUF file not found (make one with `molting export`)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[name])
    params.nthread = n_threads
    with atomic_path(out_path) as tmp, _llama_log(echo=verbose, progress=progress) as log:
        status = _in_worker_thread(
            llama_cpp.llama_model_quantize,
            str(in_path).encode("utf-8"),
            str(tmp).encode("utf-8"),
            ctypes.byref(params),
        )
        if status != 0:
            errors = "".join(text for level, text in log if level == GGML_LOG_LEVEL_ERROR).strip()
            raise ExportError(f"llama.cpp failed to quantize {in_path} to {name} (status {status}): {errors}")
    summary = fallback_summary("".join(text for level, text in log if level == GGML_LOG_LEVEL_WARN))
    if summary:
        logger.warning("%s: %s", out_path.name, summary)
    return out_path


def _in_worker_thread(fn: Callable[..., int], *args: object) -> int:
    """``fn(*args)`` run in a worker thread while this one waits; its return value.

    llama.cpp calls back into Python (its log) while it quantizes. A Ctrl-C or SIGTERM
    handled inside such a callback raises there, and ctypes drops the exception: the
    interrupt would be lost. Signals are handled in the main thread only, so here the
    callbacks never see them and the waiting thread does. llama.cpp cannot be cancelled:
    on an interrupt the worker is let finish (a second interrupt stops waiting) before
    the exception goes on to the caller's cleanup.
    """
    result: list[int] = []
    done = threading.Event()  # not Thread.join: an interrupted join() returns at once when called again

    def work() -> None:
        try:
            result.append(fn(*args))
        finally:
            done.set()

    threading.Thread(target=work, name="molting-quantize", daemon=True).start()
    try:
        done.wait()
    except BaseException:
        done.wait()
        raise
    return result[0] if result else -1


def fallback_summary(log: str) -> str:
    """One line for llama.cpp's per-tensor "falling back" warnings in ``log``; "" when none.

    Example: ``"180 tensors fell back: q4_K -> q5_0 (166), q6_K -> q8_0 (14); their rows
    (576) are not a multiple of 256"``.
    """
    matches = list(_FALLBACK.finditer(log))
    if not matches:
        return ""
    pairs = collections.Counter(f"{m['wanted']} -> {m['used']}" for m in matches)
    widths = sorted({int(m["ncols"]) for m in matches})
    blocks = sorted({int(m["block"]) for m in matches})
    return (
        f"{len(matches)} tensors fell back: {', '.join(f'{p} ({n})' for p, n in pairs.most_common())}; "
        f"their rows ({', '.join(map(str, widths))}) are not a multiple of {', '.join(map(str, blocks))}"
    )


@contextlib.contextmanager
def _llama_log(
    echo: bool = False, progress: Callable[[int, int], None] | None = None
) -> Iterator[list[tuple[int, str]]]:
    """Collect llama.cpp's log as ``(ggml level, text)`` pairs while inside.

    Continuation pieces (``GGML_LOG_LEVEL_CONT``) take the level of the message they
    continue. ``echo`` also prints everything to stderr. ``progress(done, total)`` is
    called for each of the quantizer's per-tensor lines. llama-cpp-python's own handler
    is put back on exit.
    """
    import sys

    import llama_cpp
    import llama_cpp._logger

    log: list[tuple[int, str]] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_CONT and log:
            level = log[-1][0]
        log.append((level, text.decode("utf-8", errors="replace")))
        found = _TENSOR_LINE.match(log[-1][1]) if progress is not None else None
        if found:
            progress(int(found["done"]), int(found["total"]))
        if echo:
            print(log[-1][1], end="", file=sys.stderr, flush=True)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield log
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
