"""The backends benchmark runs end to end on the tiny model; its numbers are not judged, only their shape."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "backends.py"
MESSAGES = [{"role": "system", "content": "Você é o Cláudio."}, {"role": "user", "content": "Quem é você?"}]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/backends.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("molting_bench_backends", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_both_backends_measured_in_subprocesses(bench, tiny_llama_dir, tmp_path):
    from molting.export import write_gguf

    gguf = write_gguf(tiny_llama_dir, tmp_path / "tiny.F32.gguf", outtype="f32")
    options = dict(prompts=[MESSAGES], max_new_tokens=4, repeats=1, threads=1, n_ctx=256)
    jobs = [bench.Job("transformers", str(tiny_llama_dir), **options), bench.Job("llama.cpp", str(gguf), **options)]
    results = {job.backend: bench.measure_in_subprocess(job, tmp_path) for job in jobs}

    for name, result in results.items():
        summary = result.summary()
        assert result.backend == name and len(result.samples) == 1
        assert summary["peak_vram_mib"] is None  # CPU only
        for key in ("load_s", "rss_before_load_mib", "peak_rss_mib", "ttft_s", "prefill_tok_s", "prompt_tokens"):
            assert math.isfinite(summary[key]) and summary[key] > 0, (name, key, summary[key])
        assert summary["peak_rss_mib"] >= summary["rss_before_load_mib"]
        sample = result.samples[0]
        assert 0 < sample.ttft_s <= sample.total_s and 0 <= sample.completion_tokens <= 4
        if sample.completion_tokens >= 2:
            assert math.isfinite(summary["decode_tok_s"]) and summary["decode_tok_s"] > 0
    assert results["transformers"].samples[0].prompt_tokens == results["llama.cpp"].samples[0].prompt_tokens

    table = bench.results_table(results)
    assert table.count("\n") >= 5 and "| peak RSS (MiB) |" in table and "peak VRAM" not in table
