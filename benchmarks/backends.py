"""transformers vs llama.cpp on the same persona prompts, with the same greedy decoding.

For each backend, in its own subprocess so that peak memory is the backend's own:

- load time (s): opening the model with ``molting.load_backend`` (imports not counted);
- peak RSS (MiB): ``VmHWM`` of ``/proc/self/status`` at the end of the worker, and the
  RSS after imports, before loading, to show what the imports alone cost;
- peak VRAM (MiB), on CUDA only: ``torch.cuda.max_memory_allocated`` for transformers;
  the growth of the device's used memory (``torch.cuda.mem_get_info``) for llama.cpp,
  whose allocations torch cannot see;
- TTFT (s): median over prompts and repeats of ``Response.ttft_s``;
- prefill (tokens/s): sum of prompt tokens / sum of TTFTs;
- decode (tokens/s): sum of (completion tokens - 1) / sum of (total_s - ttft_s).

The prompts are the first questions of the persona's rubric, rendered with
``Persona.messages`` (its full system prompt first). One short unrecorded generation
warms each backend up. The llama.cpp side is a GGUF written from the same model
directory (``write_gguf`` F16, then ``quantize`` to Q4_K_M) unless ``--gguf`` is given.

Usage::

    python benchmarks/backends.py [--model smollm2-135m|DIR] [--gguf PATH]
        [--out benchmarks/reports/backends.md] [--max-new-tokens N] [--repeats N] [--n-gpu-layers N]

Prints the table and writes a markdown report, with a JSON twin next to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from molting.backends import Backend, Message

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("transformers", "llama.cpp")
DEFAULT_PERSONA = REPO_ROOT / "examples" / "claudio"
DEFAULT_REPORT = REPO_ROOT / "benchmarks" / "reports" / "backends.md"
VERSIONED = ("torch", "transformers", "llama-cpp-python", "gguf")
WARMUP_TOKENS = 4
MIB = 2**20
METHOD = __doc__.split("Usage::")[0].split("\n\n", 1)[1].strip()


@dataclass(frozen=True)
class Job:
    """What one worker measures.

    Attributes:
        backend: "transformers" or "llama.cpp".
        model: a transformers model directory, or a ``.gguf`` file for llama.cpp.
        prompts: conversations to answer, each a list of {role, content} messages.
        max_new_tokens: generation cap per answer, in tokens.
        repeats: how many times every prompt is answered.
        n_gpu_layers: llama.cpp layers offloaded to the GPU (0 = CPU only, -1 = all).
        threads: CPU threads for both engines; None = each engine's default.
        n_ctx: llama.cpp context window, in tokens.
    """

    backend: str
    model: str
    prompts: list[list[Message]]
    max_new_tokens: int = 64
    repeats: int = 1
    n_gpu_layers: int = 0
    threads: int | None = None
    n_ctx: int = 2048


@dataclass(frozen=True)
class Sample:
    """One timed generation.

    Attributes:
        prompt: index of the prompt in ``Job.prompts``.
        prompt_tokens: tokens in the rendered prompt.
        completion_tokens: tokens generated.
        ttft_s: seconds from the call to the first generated token (render, tokenize, prefill, first step).
        total_s: seconds for the whole call.
        finish_reason: "stop" (end-of-generation token) or "length" (cut at max_new_tokens).
    """

    prompt: int
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str


@dataclass
class BackendResult:
    """One backend's measurements.

    Attributes:
        backend: "transformers" or "llama.cpp".
        model: what was loaded (directory or GGUF file).
        device: where it ran ("cpu", "cuda (NVIDIA H100 ...)", ...).
        threads: CPU threads the engine used, in words.
        load_s: seconds to open the model (imports excluded).
        rss_before_load_mib: resident memory after imports, before loading, in MiB.
        peak_rss_mib: peak resident memory of the worker process, in MiB.
        peak_vram_mib: peak GPU memory in MiB; None without CUDA.
        samples: the timed generations.
    """

    backend: str
    model: str
    device: str
    threads: str
    load_s: float
    rss_before_load_mib: float
    peak_rss_mib: float
    peak_vram_mib: float | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        """Median time to first token, in seconds."""
        return statistics.median(s.ttft_s for s in self.samples)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of TTFT, over all samples."""
        return sum(s.prompt_tokens for s in self.samples) / sum(s.ttft_s for s in self.samples)

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first one, over samples with >= 2 tokens; None if none has."""
        decoded = [s for s in self.samples if s.completion_tokens >= 2]
        seconds = sum(s.total_s - s.ttft_s for s in decoded)
        return sum(s.completion_tokens - 1 for s in decoded) / seconds if decoded and seconds > 0 else None

    def summary(self) -> dict[str, float | None]:
        """The table's numbers, by metric name (units in the names)."""
        return {
            "load_s": self.load_s,
            "rss_before_load_mib": self.rss_before_load_mib,
            "peak_rss_mib": self.peak_rss_mib,
            "peak_vram_mib": self.peak_vram_mib,
            "ttft_s": self.ttft_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "prompt_tokens": statistics.mean(s.prompt_tokens for s in self.samples),
            "completion_tokens": statistics.mean(s.completion_tokens for s in self.samples),
        }

    @classmethod
    def from_dict(cls, data: dict) -> BackendResult:
        """Inverse of ``dataclasses.asdict``."""
        return cls(**{**data, "samples": [Sample(**s) for s in data["samples"]]})


# --- measuring, in the worker process ---------------------------------------------------------


def measure_backend(job: Job) -> BackendResult:
    """Load ``job.model`` with ``job.backend`` and time greedy answers to ``job.prompts``.

    Peak RSS is the whole process's: call this in a fresh process (``measure_in_subprocess``)
    for a per-backend figure.

    Raises:
        ValueError: unknown backend.
    """
    from molting.backends import GenerationConfig

    if job.backend not in BACKENDS:
        raise ValueError(f"backend {job.backend!r} not in {BACKENDS}")
    _import_engine(job)
    vram = _VramMeter(job)
    rss_before = _proc_status_mib("VmRSS") or 0.0
    start = time.perf_counter()
    backend = _open_backend(job)
    load_s = time.perf_counter() - start
    try:
        config = GenerationConfig(max_new_tokens=job.max_new_tokens, repetition_penalty=1.0)  # greedy, no penalty
        backend.generate(job.prompts[0], replace(config, max_new_tokens=min(WARMUP_TOKENS, job.max_new_tokens)))
        samples = [
            _sample(i, backend.generate(messages, config))
            for _ in range(job.repeats)
            for i, messages in enumerate(job.prompts)
        ]
        device, threads = _describe(backend)
    finally:
        backend.close()
    return BackendResult(
        backend=job.backend,
        model=job.model,
        device=device,
        threads=threads,
        load_s=load_s,
        rss_before_load_mib=rss_before,
        peak_rss_mib=peak_rss_mib(),
        peak_vram_mib=vram.peak_mib(),
        samples=samples,
    )


def _import_engine(job: Job) -> None:
    """Import the engine's modules and set torch's thread count, so that the timed load excludes both."""
    if job.backend == "llama.cpp":
        import molting.backends.llamacpp  # noqa: F401

        return
    import torch

    import molting.backends.transformers  # noqa: F401

    if job.threads:
        torch.set_num_threads(job.threads)


def _open_backend(job: Job) -> Backend:
    """The engine of ``job``: llama.cpp for a GGUF, transformers (fp32) for a model directory."""
    from molting.backends import load_backend

    if job.backend == "transformers":
        return load_backend(job.model, dtype="fp32")
    # n_threads_batch follows n_threads, so --threads means the same for both engines.
    return load_backend(job.model, n_ctx=job.n_ctx, n_gpu_layers=job.n_gpu_layers, n_threads=job.threads)


def _sample(prompt: int, response) -> Sample:
    """A Sample from a ``molting.backends.Response``."""
    return Sample(
        prompt=prompt,
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        ttft_s=response.ttft_s,
        total_s=response.total_s,
        finish_reason=response.finish_reason,
    )


def _describe(backend: Backend) -> tuple[str, str]:
    """(device, threads) of an open backend, in words."""
    llm = getattr(backend, "llm", None)
    if llm is not None:  # llama.cpp
        import llama_cpp

        offload = llm.model_params.n_gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0
        device = f"gpu, n_gpu_layers={offload}" if offload else "cpu"
        return device, f"{llm.n_threads} decode / {llm.n_threads_batch} batch"
    import torch

    device = backend.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    return device, f"{torch.get_num_threads()} (torch intra-op)"


class _VramMeter:
    """Peak GPU memory of one job, in MiB; measures nothing without CUDA.

    transformers: ``torch.cuda.max_memory_allocated`` (torch's allocator, no CUDA context).
    llama.cpp: growth of the device's used memory (``mem_get_info``) from before the
    load to the end, as torch does not see llama.cpp's allocations; torch is imported
    only when layers are offloaded to a GPU build of llama.cpp.
    """

    def __init__(self, job: Job):
        self.job, self.free_before = job, None
        if not self._cuda():
            return
        import torch

        if job.backend == "transformers":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.free_before = torch.cuda.mem_get_info()[0]

    def _cuda(self) -> bool:
        if self.job.backend == "llama.cpp":
            import llama_cpp

            if self.job.n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
                return False
        if importlib.util.find_spec("torch") is None:
            return False
        import torch

        return torch.cuda.is_available()

    def peak_mib(self) -> float | None:
        if not self._cuda():
            return None
        import torch

        if self.job.backend == "transformers":
            return torch.cuda.max_memory_allocated() / MIB
        return (self.free_before - torch.cuda.mem_get_info()[0]) / MIB


def _proc_status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` memory field ("VmHWM", "VmRSS"; reported in kB) in MiB; None off Linux."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process, in MiB (VmHWM; ru_maxrss where /proc is missing)."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss / MIB if sys.platform == "darwin" else maxrss / 1024


# --- orchestrating, in the parent process ------------------------------------------------------


def measure_in_subprocess(job: Job, workdir: Path) -> BackendResult:
    """Run ``measure_backend(job)`` in a fresh Python process, so peaks are per backend.

    The worker imports the same ``molting`` as this process (its parent directory goes
    first on PYTHONPATH). Its stderr passes through.

    Raises:
        subprocess.CalledProcessError: the worker failed.
    """
    import molting

    slug = job.backend.replace(".", "")
    job_path, result_path = workdir / f"job-{slug}.json", workdir / f"result-{slug}.json"
    job_path.write_text(json.dumps(asdict(job), ensure_ascii=False), encoding="utf-8")
    paths = [str(Path(molting.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path), "--result", str(result_path)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return BackendResult.from_dict(json.loads(result_path.read_text(encoding="utf-8")))


def persona_prompts(persona_dir: Path, count: int) -> tuple[list[str], list[list[Message]]]:
    """The first ``count`` rubric questions of a persona, and their conversations (system prompt first)."""
    from molting import Persona
    from molting.eval.rubric import load_rubric

    persona = Persona.load(persona_dir)
    questions = [q.prompt for q in load_rubric(persona).questions[:count]]
    return questions, [persona.messages(q) for q in questions]


def make_gguf(model_dir: Path, workdir: Path, qtype: str = "Q4_K_M") -> Path:
    """Write ``model_dir`` as an F16 GGUF, then quantize it to ``qtype``; returns the quantized file."""
    from molting.export import quantize, write_gguf

    f16 = write_gguf(model_dir, workdir / "model.F16.gguf", outtype="f16")
    return quantize(f16, workdir / f"model.{qtype}.gguf", qtype)


def machine_info() -> dict[str, str]:
    """CPU, OS, Python and library versions, load average; without importing torch here."""
    info = {
        "cpu": _cpu_model(),
        "cpu count": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "load average (1 min, at start)": f"{os.getloadavg()[0]:.2f}",
        "niceness": str(os.nice(0)),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    for package in VERSIONED:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --- reporting ----------------------------------------------------------------------------------

ROWS = (  # (summary key, label, format); the ratio column is llama.cpp / transformers
    ("load_s", "load (s)", "{:.2f}"),
    ("rss_before_load_mib", "RSS after imports (MiB)", "{:.0f}"),
    ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
    ("peak_vram_mib", "peak VRAM (MiB)", "{:.0f}"),
    ("ttft_s", "TTFT, median (s)", "{:.3f}"),
    ("prefill_tok_s", "prefill (tokens/s)", "{:.0f}"),
    ("decode_tok_s", "decode (tokens/s)", "{:.1f}"),
    ("prompt_tokens", "prompt tokens (mean)", "{:.0f}"),
    ("completion_tokens", "completion tokens (mean)", "{:.1f}"),
)


def results_table(results: dict[str, BackendResult]) -> str:
    """Markdown table: one row per metric, one column per backend, and llama.cpp / transformers."""
    hf, cpp = results["transformers"].summary(), results["llama.cpp"].summary()
    lines = ["| metric | transformers | llama.cpp | llama.cpp / transformers |", "|---|---:|---:|---:|"]
    for key, label, fmt in ROWS:
        if hf[key] is None and cpp[key] is None:
            continue
        ratio = cpp[key] / hf[key] if hf[key] and cpp[key] is not None else None
        lines.append(f"| {label} | {_fmt(fmt, hf[key])} | {_fmt(fmt, cpp[key])} | {_fmt('{:.2f}×', ratio)} |")
    return "\n".join(lines)


def samples_table(results: dict[str, BackendResult], questions: list[str]) -> str:
    """Markdown table of every timed generation."""
    lines = ["| backend | prompt | prompt tokens | completion tokens | TTFT (s) | total (s) | finish |"]
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for name, result in results.items():
        for s in result.samples:
            lines.append(
                f"| {name} | {questions[s.prompt]} | {s.prompt_tokens} | {s.completion_tokens} "
                f"| {s.ttft_s:.3f} | {s.total_s:.3f} | {s.finish_reason} |"
            )
    return "\n".join(lines)


def _fmt(fmt: str, value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else fmt.format(value)


def render_report(results: dict[str, BackendResult], questions: list[str], settings: dict, info: dict) -> str:
    """The markdown report: settings, machine, results, per-sample timings, method."""
    setting_lines = [f"- {k}: {v}" for k, v in settings.items()]
    machine_lines = [f"- {k}: {v}" for k, v in info.items()]
    engine_lines = [f"- {r.backend}: {r.device}, threads {r.threads}, `{r.model}`" for r in results.values()]
    return "\n".join(
        [
            "# Backends: transformers vs llama.cpp",
            "",
            f"Generated by `python benchmarks/backends.py` on {settings['date']}.",
            "",
            "## Settings",
            *setting_lines,
            *engine_lines,
            "",
            "## Machine",
            *machine_lines,
            "",
            "## Results",
            results_table(results),
            "",
            "Ratios are llama.cpp / transformers within this run: below 1 is better for seconds and MiB, "
            "above 1 for tokens/s.",
            "",
            "## Samples",
            samples_table(results, questions),
            "",
            "## Method",
            METHOD,
            "",
        ]
    )


def run(args: argparse.Namespace) -> dict[str, BackendResult]:
    """Prepare the model and GGUF, measure both backends in subprocesses, write the report."""
    from molting.models import resolve_base_model

    model_dir = resolve_base_model(args.model)
    questions, prompts = persona_prompts(Path(args.persona), args.prompts)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="molting-bench-") as tmp:
        workdir = Path(tmp)
        gguf = Path(args.gguf) if args.gguf else make_gguf(model_dir, workdir)
        settings = _settings(args, model_dir, gguf, questions)
        options = dict(max_new_tokens=args.max_new_tokens, repeats=args.repeats, threads=args.threads)
        jobs = [
            Job("transformers", str(model_dir), prompts, **options),
            Job("llama.cpp", str(gguf), prompts, n_gpu_layers=args.n_gpu_layers, **options),
        ]
        results = {job.backend: measure_in_subprocess(job, workdir) for job in jobs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(results, questions, settings, info), encoding="utf-8")
    record = {
        "settings": settings,
        "machine": info,
        "questions": questions,
        "results": {k: asdict(v) for k, v in results.items()},
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return results


def _settings(args: argparse.Namespace, model_dir: Path, gguf: Path, questions: list[str]) -> dict:
    source = str(gguf) if args.gguf else "F16 → Q4_K_M, written from the model"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"{args.model} (transformers fp32 from `{model_dir}`)",
        "gguf": f"{source} ({gguf.stat().st_size / MIB:.0f} MiB)",
        "prompts": f"{len(questions)} from {args.persona}: " + " / ".join(questions),
        "decoding": f"greedy, repetition_penalty 1.0, max_new_tokens {args.max_new_tokens}",
        "repeats": args.repeats,
        "threads": args.threads or "engine defaults",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or transformers directory")
    parser.add_argument("--gguf", help="GGUF for llama.cpp; default: F16 → Q4_K_M written from --model")
    parser.add_argument("--out", default=str(DEFAULT_REPORT), help="markdown report (a .json twin is written too)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="times every prompt is answered")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers on the GPU (-1 = all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both engines")
    parser.add_argument("--persona", default=str(DEFAULT_PERSONA), help="persona directory with rubric.yaml")
    parser.add_argument("--prompts", type=int, default=3, help="how many rubric questions to ask")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:  # a subprocess of measure_in_subprocess
        job = Job(**json.loads(Path(args.worker).read_text(encoding="utf-8")))
        Path(args.result).write_text(json.dumps(asdict(measure_backend(job))), encoding="utf-8")
        return
    results = run(args)
    print(results_table(results))
    print(f"\nreport: {args.out} (and {Path(args.out).with_suffix('.json')})")


if __name__ == "__main__":
    if importlib.util.find_spec("molting") is None:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
    main()
