"""``molting bench``: every engine x model x quantization, each run in a fresh process.

:func:`bench` prepares the models (``molting.bench.models.resolve``: a GGUF file, a run
directory, a model directory, the embedded SmolLM2, random-weight stand-ins of reference
configurations, their GGUFs), runs every
:class:`~molting.bench.measure.Job` ``repeats`` times, each time in its own process
(:func:`run_job`), in rounds (every case once, then again) so that the machine's load
drifts alike over all engines, and returns a :class:`Report`: the runs, their minimum and median, the
llama.cpp backend's decode speed as a ratio of raw llama.cpp's on the same file, and the
fit planner's estimate of resident memory beside the measured peak. Where llama.cpp's own
``llama-bench`` is built (``make llama-bench``), it runs once a round on every GGUF with the
same threads, batch, flash attention and repacking (``molting.bench.llamabench``), and the
report gives molting's prefill and decode as ratios of its ``pp`` at depth 0 and ``tg`` at
depth ``n_prompt``.
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
from molting.bench import llamabench
from molting.bench.measure import ENGINES, Job, Run
from molting.bench.models import gguf_file, gguf_quant, resolve
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
    references: list[Reference] = field(default_factory=list)

    def reference_ratio(self, case: Case, metric: str) -> float | None:
        """A llama.cpp case's ``prefill_tok_s`` or ``decode_tok_s`` over llama-bench's on the same file.

        Prefill is compared with ``pp<n_prompt>`` at depth 0, decode with ``tg<n_new>`` at depth
        ``n_prompt`` (molting decodes right after its prompt); the median of the per-round ratios.
        None for transformers, or without llama-bench on this file.
        """
        ref = next((r for r in self.references if r.gguf == case.job.model), None)
        if ref is None or case.engine == "transformers":
            return None
        job = case.job
        test, n, depth = ("pp", job.n_prompt, 0) if metric == "prefill_tok_s" else ("tg", job.n_new, job.n_prompt)
        ratios = []
        for run, results in zip(case.runs, ref.rounds, strict=False):
            mine, theirs = getattr(run, metric), llamabench.find(results, test, n, depth)
            if mine and theirs and theirs.tok_s > 0:
                ratios.append(mine / theirs.tok_s)
        return statistics.median(ratios) if ratios else None

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
            {
                **asdict(c),
                "summary": summary(c),
                "decode_vs_raw": self.raw_ratio(c),
                "prefill_vs_llama_bench": self.reference_ratio(c, "prefill_tok_s"),
                "decode_vs_llama_bench": self.reference_ratio(c, "decode_tok_s"),
                "label": c.label,
            }
            for c in self.cases
        ]
        references = [asdict(r) for r in self.references]
        return {
            "settings": self.settings,
            "machine": self.machine,
            "skipped": self.skipped,
            "cases": cases,
            "llama_bench": references,
        }


@dataclass
class Reference:
    """llama.cpp's ``llama-bench`` on one GGUF, once per round.

    Attributes:
        model, weights: as in the Case on the same file.
        gguf: the file.
        rounds: each round's results (pp and tg at depths 0 and ``n_prompt``).
        facts: llama-bench's build commit, CPU, backends, threads, flash attention.
    """

    model: str
    weights: str
    gguf: str
    rounds: list[list[llamabench.Result]] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def median(self, test: str, n: int, depth: int) -> float | None:
        """Median tokens/s of one test over the rounds; None if it never ran."""
        values = [r.tok_s for results in self.rounds if (r := llamabench.find(results, test, n, depth))]
        return statistics.median(values) if values else None


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


REFERENCE = llamabench.TOOL  # an engine name too: llama.cpp's own llama-bench on every GGUF


@dataclass(frozen=True)
class BenchConfig:
    """What to bench.

    Attributes:
        models: GGUF files, run directories, model directories, embedded names or
            reference names (random weights); see ``molting.bench.models.resolve``.
        engines: subset of ``ENGINES`` and ``REFERENCE``; ``llama.cpp raw`` and ``llama-bench``
            run on every GGUF llama.cpp runs on.
        quants: GGUF quantizations built for llama.cpp (``Q4_K_M``, ``Q8_0``, ``F16``, ...); a
            GGUF file or a run directory is benched as it is.
        dtype: transformers weights (``fp32``, ``bf16``, ``4bit``).
        repeats: runs per case, each in a fresh process.
        n_prompt, n_new, n_ctx, n_gpu_layers, repack, flash_attn: as in ``Job``.
        threads: CPU threads for every engine; None = every usable CPU (the same for all).
        cache: where built models and GGUFs are kept.
    """

    models: tuple[str, ...] = ("smollm2-135m",)
    engines: tuple[str, ...] = (*ENGINES, REFERENCE)
    quants: tuple[str, ...] = ("Q4_K_M",)
    dtype: str = "fp32"
    repeats: int = 3
    n_prompt: int = 512
    n_new: int = 128
    n_ctx: int = 2048
    threads: int | None = None
    n_gpu_layers: int = 0
    repack: bool = True
    flash_attn: bool = True
    cache: Path = field(default_factory=lambda: _default_cache())

    @property
    def n_threads(self) -> int:
        """``threads``, or every CPU this process may run on."""
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _default_cache() -> Path:
    return cache_dir().parent / "bench"


def plan_cases(config: BenchConfig, progress: Callable[[str], None] = print) -> tuple[list[Case], list[str]]:
    """The cases of ``config``, with models and GGUFs built or found in the cache; and what was skipped, why.

    Raises:
        ConfigError: an unknown engine or model.
    """
    unknown = set(config.engines) - {*ENGINES, REFERENCE}
    if unknown:
        raise ConfigError(f"unknown engine(s) {sorted(unknown)}; allowed: {(*ENGINES, REFERENCE)}")
    job = dict(n_prompt=config.n_prompt, n_new=config.n_new, n_ctx=config.n_ctx, threads=config.n_threads)
    cases, skipped = [], []
    for name in config.models:
        model = resolve(name, config.cache)
        if "transformers" in config.engines:
            if model.gguf_only:
                skipped.append(f"{name} transformers: a GGUF file, no transformers weights")
            else:
                progress(f"{name}: transformers model directory")
                job_t = Job("transformers", str(model.model_dir(config.cache)), dtype=config.dtype, **job)
                cases.append(Case(name, "transformers", config.dtype, job_t))
        gguf_job = dict(job, n_gpu_layers=config.n_gpu_layers, repack=config.repack, flash_attn=config.flash_attn)
        for engine in [e for e in config.engines if e in ENGINES and e != "transformers"]:
            for quant, gguf in _ggufs(model, config, progress, skipped):
                cases.append(Case(name, engine, quant, Job(engine, str(gguf), **gguf_job)))
    skipped = list(dict.fromkeys(skipped))
    return cases, skipped


def _ggufs(model, config: BenchConfig, progress, skipped: list[str]) -> list[tuple[str, Path]]:
    """(quantization, file) of every GGUF to bench for ``model``: its own, else built at ``config.quants``."""
    if model.ggufs:
        return [(gguf_quant(path), path) for path in model.ggufs]
    found = []
    for quant in config.quants:
        try:
            progress(f"{model.name}: {quant} GGUF")
            source = str(model.weights) if model.weights else model.name
            found.append((quant, gguf_file(source, quant, config.cache, n_threads=config.threads or 0)))
        except ExportError as exc:
            skipped.append(f"{model.name} {quant}: {exc}")
    return found


def plan_references(config: BenchConfig, cases: list[Case], skipped: list[str]) -> list[Reference]:
    """One llama-bench Reference per GGUF of ``cases``, when asked for and built; else a line in ``skipped``."""
    if REFERENCE not in config.engines:
        return []
    files = {c.job.model: c for c in cases if c.engine != "transformers"}
    if files and llamabench.tool_path() is None:
        skipped.append("llama-bench: not built here (`make llama-bench` builds it from llama-cpp-python's source)")
        return []
    return [Reference(c.model, c.weights, gguf) for gguf, c in files.items()]


def bench(config: BenchConfig, progress: Callable[[str], None] = print) -> Report:
    """Measure every case of ``config`` ``repeats`` times; see the module docstring.

    Args:
        config: what to bench.
        progress: called with a line before each step.

    Raises:
        ConfigError: an unknown engine or model. subprocess.CalledProcessError: a worker
            or llama-bench failed.
    """
    cases, skipped = plan_cases(config, progress)
    references = plan_references(config, cases, skipped)
    settings = llamabench.Settings(
        n_prompt=config.n_prompt,
        n_new=config.n_new,
        threads=config.n_threads,
        n_gpu_layers=config.n_gpu_layers,
        flash_attn=config.flash_attn,
        repack=config.repack,
        repeats=1,
    )
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="molting-bench-") as tmp:
        for i in range(config.repeats):  # rounds over the cases: a change of load hits every engine alike
            for case in cases:
                progress(f"{case.label}: run {i + 1}/{config.repeats}")
                case.runs.append(run_job(case.job, Path(tmp)))
            for ref in references:
                progress(f"{ref.model} · llama-bench · {ref.weights}: run {i + 1}/{config.repeats}")
                results, ref.facts = llamabench.run(llamabench.tool_path(), Path(ref.gguf), settings)
                ref.rounds.append(results)
    for case in cases:
        case.note = _note(case)
        case.rss_estimate_mib = _rss_estimate(case)
    report = Report(settings=_settings(config), machine=machine, cases=cases, skipped=skipped)
    report.references = references
    return report


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
        "threads": config.n_threads,
        "flash attention (llama.cpp)": "on" if config.flash_attn else "off",
        "llama.cpp batch": "n_batch = n_ubatch = 512",
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
