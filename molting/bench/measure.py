"""One measurement, in the process that makes it: load a model, answer one long prompt, time it.

Three engines:

- ``transformers`` and ``llama.cpp``: molting's backends (``molting.load_backend``), asked
  through the public ``Backend.generate`` with a chat message whose rendered prompt is
  ``n_prompt`` tokens, greedy, no repetition penalty, ``max_new_tokens = n_new``;
- ``llama.cpp raw``: the same GGUF through llama-cpp-python's low-level C API
  (``llama_decode`` on one batch of ``n_prompt`` tokens, then one token at a time with a
  greedy sampler, end-of-generation ignored), the baseline the backend's overhead is a
  ratio to. Its context is the backend's: ``n_batch = n_ubatch = 512``, the job's flash attention.

Each :class:`Job` runs in a fresh process (:func:`molting.bench.run_job`) so that its peak
resident memory is its own. The figures, per run:

- ``load_s``: seconds to open the model (imports excluded);
- ``rss_base_mib``: resident memory after imports, before loading; ``peak_rss_mib``: the
  process's peak (``VmHWM``);
- ``peak_vram_mib``: with CUDA only, NVML's used memory of this process sampled every 10 ms
  (llama.cpp's allocations included), and ``torch_peak_mib``, the torch allocator's peak;
- ``ttft_s``: from the call to the first generated token (template, tokenization, prefill, first step);
- ``prefill_tok_s``: prompt tokens / TTFT; ``decode_tok_s``: (tokens - 1) / (total - TTFT).

One warm-up generation (the same prompt, 2 new tokens) precedes the timed one.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from molting.backends import GenerationConfig, load_backend
from molting.errors import ConfigError

ENGINES = ("transformers", "llama.cpp", "llama.cpp raw")
MIB = 2**20
FILLER = (
    "Molting moves a persona from one model to another. The quick brown fox jumps over the lazy dog "
    "while the river runs to the sea, and every token of this text is there to fill the prompt. "
)
INSTRUCTION = "\n\nContinue this text for as long as you can."


@dataclass(frozen=True)
class Job:
    """What one worker process measures.

    Attributes:
        engine: one of ``ENGINES``.
        model: a transformers directory (``transformers``) or a ``.gguf`` file.
        n_prompt: prompt length, tokens (the rendered chat for the backends).
        n_new: tokens to generate.
        n_ctx: llama.cpp context window, tokens.
        threads: CPU threads (torch intra-op; llama.cpp decode and batch); None = engine default.
        n_gpu_layers: llama.cpp layers offloaded (0 = CPU only, -1 = all).
        dtype: transformers weights: ``fp32``, ``bf16`` or ``4bit``.
        repack: let llama.cpp copy weights into its CPU-specific layouts (AMX, repacked
            Q4_0/Q4_K: ``use_extra_bufts``); False is llama.cpp's ``--no-repack``, needed
            where the AMX kernels trap (SIGILL) as on this project's CPU machine.
        flash_attn: llama.cpp's flash attention (``-fa``), for the backend, raw and llama-bench alike.
    """

    engine: str
    model: str
    n_prompt: int = 512
    n_new: int = 128
    n_ctx: int = 2048
    threads: int | None = None
    n_gpu_layers: int = 0
    dtype: str = "fp32"
    repack: bool = True
    flash_attn: bool = True


@dataclass
class Run:
    """One run's figures (units in the names); see the module docstring."""

    load_s: float
    rss_base_mib: float
    peak_rss_mib: float
    ttft_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    peak_vram_mib: float | None = None
    torch_peak_mib: float | None = None
    device: str = "cpu"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float | None:
        seconds = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / seconds if self.completion_tokens >= 2 and seconds > 0 else None


def measure(job: Job) -> Run:
    """Load ``job.model`` with ``job.engine`` and time one generation; call in a fresh process.

    Raises:
        ValueError: unknown engine.
    """
    if job.engine not in ENGINES:
        raise ValueError(f"engine {job.engine!r} not in {ENGINES}")
    _import_engine(job)
    vram = VramMeter(job)
    rss_base = proc_status_mib("VmRSS") or 0.0
    with vram:
        if job.engine == "llama.cpp raw":
            load_s, ttft_s, total_s, prompt, completion = _raw_llamacpp(job)
        else:
            load_s, ttft_s, total_s, prompt, completion = _backend(job)
    return Run(
        load_s=load_s,
        rss_base_mib=rss_base,
        peak_rss_mib=peak_rss_mib(),
        ttft_s=ttft_s,
        total_s=total_s,
        prompt_tokens=prompt,
        completion_tokens=completion,
        peak_vram_mib=vram.peak_mib,
        torch_peak_mib=vram.torch_peak_mib,
        device=vram.device,
    )


def _import_engine(job: Job) -> None:
    """Import the engine and set torch's threads, so that the timed load excludes both."""
    if job.engine != "transformers":
        import llama_cpp

        import molting.backends.llamacpp  # noqa: F401

        if not job.repack:
            _no_repack(llama_cpp)
        return
    import torch

    import molting.backends.transformers  # noqa: F401

    if job.threads:
        torch.set_num_threads(job.threads)


def _no_repack(llama_cpp) -> None:
    """Make every model llama-cpp-python opens in this process skip the extra buffer types.

    ``LlamaCppBackend`` has no such option; ``Llama`` starts from
    ``llama_model_default_params()``, so this worker process wraps that function.
    """
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


# --- molting's backends ----------------------------------------------------------------------


def _backend(job: Job) -> tuple[float, float, float, int, int]:
    """(load_s, ttft_s, total_s, prompt tokens, completion tokens) through ``Backend.generate``."""
    start = time.perf_counter()
    if job.engine == "transformers":
        backend = load_backend(job.model, dtype=job.dtype)
    else:
        options = dict(n_ctx=job.n_ctx, n_gpu_layers=job.n_gpu_layers, n_threads=job.threads)
        backend = load_backend(job.model, flash_attn=job.flash_attn, **options)
    load_s = time.perf_counter() - start
    try:
        messages = prompt_messages(lambda m: _count(backend, m), job.n_prompt)
        greedy = GenerationConfig(max_new_tokens=job.n_new, repetition_penalty=1.0)
        backend.generate(messages, greedy, max_new_tokens=2)  # warm-up
        response = backend.generate(messages, greedy)
    finally:
        backend.close()
    return load_s, response.ttft_s, response.total_s, response.prompt_tokens, response.completion_tokens


def _count(backend, messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered with the backend's chat template and tokenizer."""
    if hasattr(backend, "prompt_tokens"):  # llama.cpp
        return len(backend.prompt_tokens(messages))
    ids = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return len(ids["input_ids"])


def prompt_messages(count, n_prompt: int) -> list[dict]:
    """A one-message chat whose rendered prompt is as close to ``n_prompt`` tokens as ``count`` allows.

    Args:
        count: ``count(messages) -> tokens`` with the model's template and tokenizer.
        n_prompt: the target, tokens.

    Returns:
        The longest prefix of a repeated filler text (cut at a character, then the
        instruction to continue) whose chat is at most ``n_prompt`` tokens.

    Raises:
        ConfigError: the chat without filler is already longer than ``n_prompt``.
    """
    text = FILLER * (n_prompt // 8 + 1)

    def chat(n_chars: int) -> list[dict]:
        return [{"role": "user", "content": text[:n_chars] + INSTRUCTION}]

    low, high = 0, len(text)
    if count(chat(0)) > n_prompt:
        raise ConfigError(
            f"n_prompt={n_prompt} is shorter than the chat template and instruction ({count(chat(0))} tokens)"
        )
    while count(chat(high)) < n_prompt:  # a tokenizer with more than 8 characters a token
        text += FILLER * (n_prompt // 8 + 1)
        high = len(text)
    while low < high:  # largest n_chars with count <= n_prompt
        middle = (low + high + 1) // 2
        if count(chat(middle)) <= n_prompt:
            low = middle
        else:
            high = middle - 1
    return chat(low)


# --- raw llama.cpp ---------------------------------------------------------------------------------


def _raw_llamacpp(job: Job) -> tuple[float, float, float, int, int]:
    """(load_s, ttft_s, total_s, prompt tokens, completion tokens) through llama.cpp's C API.

    The prompt is the filler text's first ``n_prompt`` tokens (no chat template: the
    engine sees token ids only); the answer is ``n_new`` greedy tokens, end-of-generation
    ignored. The context is llama.cpp's defaults with ``n_ctx``, the threads and
    ``n_gpu_layers`` of the job, as the backend opens it.
    """
    import llama_cpp as C

    global _SILENT_LOG
    _SILENT_LOG = _SILENT_LOG or _silent_log_callback()  # kept alive: llama.cpp calls it later
    C.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
    C.llama_backend_init()
    start = time.perf_counter()
    model_params = C.llama_model_default_params()
    model_params.n_gpu_layers = 0x7FFFFFFF if job.n_gpu_layers < 0 else job.n_gpu_layers
    model_params.use_extra_bufts = job.repack
    model = C.llama_model_load_from_file(job.model.encode("utf-8"), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {job.model}")
    ctx_params = C.llama_context_default_params()
    ctx_params.n_ctx = job.n_ctx
    ctx_params.n_batch = ctx_params.n_ubatch = min(job.n_ctx, 512)  # as LlamaCppBackend (llama-cpp-python)
    on, off = C.LLAMA_FLASH_ATTN_TYPE_ENABLED, C.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx_params.flash_attn_type = on if job.flash_attn else off
    if job.threads:
        ctx_params.n_threads = ctx_params.n_threads_batch = job.threads
    ctx = C.llama_init_from_model(model, ctx_params)
    load_s = time.perf_counter() - start
    vocab = C.llama_model_get_vocab(model)
    prompt = _raw_tokens(C, vocab, job.n_prompt)
    sampler = C.llama_sampler_init_greedy()
    try:
        _raw_generate(C, ctx, sampler, prompt, 2)  # warm-up
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        ttft_s, total_s, n = _raw_generate(C, ctx, sampler, prompt, job.n_new)
    finally:
        C.llama_sampler_free(sampler)
        C.llama_free(ctx)
        C.llama_model_free(model)
    return load_s, ttft_s, total_s, len(prompt), n


def _raw_tokens(C, vocab, n_prompt: int) -> list[int]:
    """The first ``n_prompt`` tokens of the repeated filler text (BOS first when the model adds one)."""
    text = (FILLER * (n_prompt // 4 + 1)).encode("utf-8")
    buffer = (C.llama_token * (len(text) + 8))()
    n = C.llama_tokenize(vocab, text, len(text), buffer, len(buffer), True, False)
    if n < n_prompt:
        raise RuntimeError(f"the filler text is {n} tokens, fewer than n_prompt={n_prompt}")
    return list(buffer[:n_prompt])


def _raw_generate(C, ctx, sampler, prompt: list[int], n_new: int) -> tuple[float, float, int]:
    """Decode ``prompt`` as one batch, then ``n_new`` greedy tokens; (ttft_s, total_s, tokens)."""
    start = time.perf_counter()
    tokens = (C.llama_token * len(prompt))(*prompt)
    if C.llama_decode(ctx, C.llama_batch_get_one(tokens, len(prompt))) != 0:
        raise RuntimeError("llama_decode failed on the prompt")
    token = C.llama_sampler_sample(sampler, ctx, -1)
    ttft = time.perf_counter() - start
    one = (C.llama_token * 1)()
    for _ in range(n_new - 1):
        one[0] = token
        if C.llama_decode(ctx, C.llama_batch_get_one(one, 1)) != 0:
            raise RuntimeError("llama_decode failed while generating")
        token = C.llama_sampler_sample(sampler, ctx, -1)
    return ttft, time.perf_counter() - start, n_new


_SILENT_LOG = None


def _silent_log_callback():
    """A llama.cpp log callback that drops everything (llama.cpp logs every tensor while loading)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    return silent


# --- memory --------------------------------------------------------------------------------------


class VramMeter:
    """Peak GPU memory while inside, in MiB; measures nothing without CUDA.

    ``peak_mib``: this process's used memory as NVML reports it
    (``nvmlDeviceGetComputeRunningProcesses``), sampled every 10 ms in a thread: it sees
    llama.cpp's and torch's allocations and the CUDA context. ``torch_peak_mib``: the torch
    allocator's peak (``torch.cuda.max_memory_allocated``), transformers only.
    """

    def __init__(self, job: Job):
        self.job, self.peak_mib, self.torch_peak_mib, self.device = job, None, None, "cpu"
        self._handle, self._stop = None, threading.Event()

    def __enter__(self) -> VramMeter:
        if not self._cuda():
            return self
        import pynvml

        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # NVML counts physical devices
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        self.device = f"cuda ({pynvml.nvmlDeviceGetName(self._handle)})"
        self.peak_mib = 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is None:
            return
        self._stop.set()
        self._thread.join()
        if self.job.engine == "transformers":
            import torch

            self.torch_peak_mib = torch.cuda.max_memory_allocated() / MIB

    def _sample(self) -> None:
        import pynvml

        pid = os.getpid()
        while not self._stop.wait(0.01):
            used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle) if p.pid == pid]
            if used and used[0] is not None:
                self.peak_mib = max(self.peak_mib, used[0] / MIB)

    def _cuda(self) -> bool:
        if self.job.engine != "transformers":
            import llama_cpp

            if self.job.n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
                return False
        elif importlib.util.find_spec("torch") is None:
            return False
        else:
            import torch

            if not torch.cuda.is_available():
                return False
        return importlib.util.find_spec("pynvml") is not None


def proc_status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``; in kB there) in MiB; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process, in MiB (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    peak = proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    """Worker entry point (``python -m molting.bench JOB.json RESULT.json``): measure, write the Run as JSON."""
    import json
    from dataclasses import asdict

    job_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    job = Job(**json.loads(Path(job_path).read_text(encoding="utf-8")))
    Path(result_path).write_text(json.dumps(asdict(measure(job))), encoding="utf-8")
