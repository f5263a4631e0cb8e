"""``molting bench``: every engine x model x quantization, each run in a fresh process.

:func:`bench` prepares the models (``molting.bench.models``: the embedded SmolLM2,
random-weight stand-ins of reference configurations, their GGUFs), runs every
:class:`~molting.bench.measure.Job` ``repeats`` times, each time in its own process
(:func:`run_job`), in rounds (every case once, then again) so that the machine's load
drifts alike over all engines, and returns a :class:`Report`: the runs, their minimum and median, the
llama.cpp backend's decode speed as a ratio of raw llama.cpp's on the same file, and the
fit planner's estimate of resident memory beside the measured peak.
:func:`molting.bench.report.write` writes it as JSON, markdown and a PNG chart.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import molting
from molting.bench.measure import ENGINES, Job, Run
from molting.bench.models import gguf_file, model_dir
from molting.errors import ConfigError, ExportError
from molting.fit import MIB, estimate, shape_from_gguf
from molting.models import cache_dir

VERSIONED = ("molting", "torch", "transformers", "llama-cpp-python", "gguf")


@dataclass
class Case:
    """One engine on one model file, measured ``len(runs)`` times.

    Attributes:
        model: the model's name as asked (``smollm2-135m``, ``tinyllama-1.1b``, a directory).
        engine: one of ``molting.bench.measure.ENGINES``.
        weights: ``fp32``/``bf16``/``4bit`` for transformers, the GGUF's quantization for llama.cpp.
        job: what every run did.
        runs: the runs.
        rss_estimate_mib: the fit planner's resident-memory estimate (llama.cpp on CPU only).
        note: what the reader must know (a run that stopped before ``n_new`` tokens).
    """

    model: str
    engine: str
    weights: str
    job: Job
    runs: list[Run] = field(default_factory=list)
    rss_estimate_mib: float | None = None
    note: str = ""

    def stat(self, metric: str, how: str = "median") -> float | None:
        """``min``, ``max`` or ``median`` of a Run attribute over the runs; None when any run lacks it."""
        values = [getattr(r, metric) for r in self.runs]
        if not values or any(v is None for v in values):
            return None
        return {"min": min, "max": max, "median": statistics.median}[how](values)

    @property
    def label(self) -> str:
        return f"{self.model} · {self.engine} · {self.weights}"


@dataclass
class Report:
    """A bench: its settings, the machine and the cases."""

    settings: dict
    machine: dict
    cases: list[Case]
    skipped: list[str] = field(default_factory=list)

    def raw_ratio(self, case: Case) -> float | None:
        """Decode tokens/s of a llama.cpp backend case over raw llama.cpp's on the same file.

        The median of the ratios within each round (run ``i`` of both, adjacent in time, so
        a shared machine's load drift cancels); None without a raw case or a decode figure.
        """
        if case.engine != "llama.cpp":
            return None
        raw = next((c for c in self.cases if c.engine == "llama.cpp raw" and c.job.model == case.job.model), None)
        pairs = zip(case.runs, raw.runs if raw else [], strict=False)
        ratios = [a.decode_tok_s / b.decode_tok_s for a, b in pairs if a.decode_tok_s and b.decode_tok_s]
        return statistics.median(ratios) if ratios else None

    def to_dict(self) -> dict:
        cases = [
            {**asdict(c), "summary": summary(c), "decode_vs_raw": self.raw_ratio(c), "label": c.label}
            for c in self.cases
        ]
        return {"settings": self.settings, "machine": self.machine, "skipped": self.skipped, "cases": cases}


METRICS = ("load_s", "peak_rss_mib", "peak_vram_mib", "torch_peak_mib", "ttft_s", "prefill_tok_s", "decode_tok_s")


def summary(case: Case) -> dict[str, float | None]:
    """Minimum, median and maximum of every metric (``load_s_min``, ``load_s_median``, ...)."""
    return {f"{m}_{how}": case.stat(m, how) for m in METRICS for how in ("min", "median", "max")}


def run_job(job: Job, workdir: Path) -> Run:
    """``measure(job)`` in a fresh Python process, so that peaks are the job's own.

    The worker imports the same ``molting`` as this process (its parent goes first on
    PYTHONPATH); its stdout is dropped and its stderr passes through.

    Raises:
        subprocess.CalledProcessError: the worker failed.
    """
    job_path = Path(tempfile.mkstemp(suffix=".json", prefix="job-", dir=workdir)[1])
    result_path = job_path.with_name(job_path.stem + "-result.json")
    job_path.write_text(json.dumps(asdict(job)), encoding="utf-8")
    paths = [str(Path(molting.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, "-m", "molting.bench", str(job_path), str(result_path)]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return Run(**json.loads(result_path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class BenchConfig:
    """What to bench.

    Attributes:
        models: embedded names, reference names (random weights) or model directories.
        engines: subset of ``ENGINES``; ``llama.cpp raw`` runs on every GGUF llama.cpp runs on.
        quants: GGUF quantizations for llama.cpp (``Q4_K_M``, ``Q8_0``, ``F16``, ...).
        dtype: transformers weights (``fp32``, ``bf16``, ``4bit``).
        repeats: runs per case, each in a fresh process.
        n_prompt, n_new, n_ctx, threads, n_gpu_layers, repack: as in ``Job``.
        cache: where built models and GGUFs are kept.
    """

    models: tuple[str, ...] = ("smollm2-135m",)
    engines: tuple[str, ...] = ENGINES
    quants: tuple[str, ...] = ("Q4_K_M",)
    dtype: str = "fp32"
    repeats: int = 3
    n_prompt: int = 512
    n_new: int = 128
    n_ctx: int = 2048
    threads: int | None = None
    n_gpu_layers: int = 0
    repack: bool = True
    cache: Path = field(default_factory=lambda: _default_cache())


def _default_cache() -> Path:
    return cache_dir().parent / "bench"


def plan_cases(config: BenchConfig, progress: Callable[[str], None] = print) -> tuple[list[Case], list[str]]:
    """The cases of ``config``, with models and GGUFs built or found in the cache; and what was skipped, why.

    Raises:
        ConfigError: an unknown engine or model.
    """
    unknown = set(config.engines) - set(ENGINES)
    if unknown:
        raise ConfigError(f"unknown engine(s) {sorted(unknown)}; allowed: {ENGINES}")
    job = dict(n_prompt=config.n_prompt, n_new=config.n_new, n_ctx=config.n_ctx, threads=config.threads)
    gguf_job = dict(job, n_gpu_layers=config.n_gpu_layers, repack=config.repack)
    cases, skipped = [], []
    for name in config.models:
        if "transformers" in config.engines:
            progress(f"{name}: transformers model directory")
            path = str(model_dir(name, config.cache))
            cases.append(Case(name, "transformers", config.dtype, Job("transformers", path, dtype=config.dtype, **job)))
        for engine in [e for e in config.engines if e != "transformers"]:
            for quant in config.quants:
                try:
                    progress(f"{name}: {quant} GGUF")
                    gguf = str(gguf_file(name, quant, config.cache, n_threads=config.threads or 0))
                except ExportError as exc:
                    skipped.append(f"{name} {quant}: {exc}")
                    continue
                cases.append(Case(name, engine, quant, Job(engine, gguf, **gguf_job)))
    skipped = list(dict.fromkeys(skipped))
    return cases, skipped


def bench(config: BenchConfig, progress: Callable[[str], None] = print) -> Report:
    """Measure every case of ``config`` ``repeats`` times; see the module docstring.

    Args:
        config: what to bench.
        progress: called with a line before each step.

    Raises:
        ConfigError: an unknown engine or model. subprocess.CalledProcessError: a worker failed.
    """
    cases, skipped = plan_cases(config, progress)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="molting-bench-") as tmp:
        for i in range(config.repeats):  # rounds over the cases: a change of load hits every engine alike
            for case in cases:
                progress(f"{case.label}: run {i + 1}/{config.repeats}")
                case.runs.append(run_job(case.job, Path(tmp)))
    for case in cases:
        case.note = _note(case)
        case.rss_estimate_mib = _rss_estimate(case)
    return Report(settings=_settings(config), machine=machine, cases=cases, skipped=skipped)


def _note(case: Case) -> str:
    short = sorted({r.completion_tokens for r in case.runs if r.completion_tokens < case.job.n_new})
    return f"stopped at end-of-generation after {short} tokens" if short else ""


def _rss_estimate(case: Case) -> float | None:
    """The planner's resident memory for a llama.cpp case on the CPU, in MiB; None otherwise."""
    if case.engine == "transformers" or case.job.n_gpu_layers != 0:
        return None
    job = case.job
    shape = shape_from_gguf(Path(job.model))
    ram = estimate(shape, shape.file_type, job.n_ctx, n_gpu_layers=0, n_prompt=job.n_prompt, repack=job.repack).ram
    return ram / MIB


def _settings(config: BenchConfig) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "prompt": f"{config.n_prompt} tokens (rendered chat for the backends, token ids for raw llama.cpp)",
        "generation": f"{config.n_new} new tokens, greedy, repetition_penalty 1.0",
        "n_ctx": config.n_ctx,
        "threads": config.threads or "engine defaults",
        "n_gpu_layers": config.n_gpu_layers,
        "llama.cpp weight repacking": "on" if config.repack else "off (--no-repack)",
        "repeats": f"{config.repeats}, each in a fresh process after a warm-up generation",
        "transformers weights": config.dtype,
    }


def machine_info() -> dict[str, str]:
    """CPU, cores, load, OS, Python, GPU and library versions; without importing torch here."""
    info = {
        "cpu": _cpu_model(),
        "cpu count": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "load average (1 min, at start)": f"{os.getloadavg()[0]:.2f}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu_name() or "none",
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


def _gpu_name() -> str | None:
    """NVML's name of GPU 0, or None without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception:  # noqa: BLE001 - no pynvml, no driver, no device: all mean "none"
        return None
