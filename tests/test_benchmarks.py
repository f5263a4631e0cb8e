"""molting bench runs end to end on the tiny model; its numbers are not judged, only their shape."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from molting.bench import BenchConfig, Case, Report, bench, report
from molting.bench.measure import Job, prompt_messages
from molting.errors import ConfigError

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "backends.py"


def test_prompt_is_fitted_to_the_token_count():
    def count(messages):  # 4 characters a token, 10 tokens of template
        return 10 + len(messages[0]["content"]) // 4

    messages = prompt_messages(count, 512)
    assert count(messages) == 512 and messages[0]["role"] == "user"
    with pytest.raises(ConfigError, match="n_prompt=12"):
        prompt_messages(count, 12)


@pytest.fixture(scope="module")
def tiny_report(tiny_llama_dir, tmp_path_factory) -> Report:
    """Every engine on the tiny model (F16 GGUF), one run each, each in its own process."""
    config = BenchConfig(
        models=(str(tiny_llama_dir),),
        quants=("F16",),
        repeats=1,
        n_prompt=160,
        n_new=4,
        n_ctx=256,
        threads=1,
        repack=False,  # llama.cpp's AMX kernels trap on the project's CPU machine
        cache=tmp_path_factory.mktemp("bench-cache"),
    )
    return bench(config, progress=lambda line: None)


def test_every_engine_measured(tiny_report):
    assert [c.engine for c in tiny_report.cases] == ["transformers", "llama.cpp", "llama.cpp raw"]
    for case in tiny_report.cases:
        (run,) = case.runs
        assert run.peak_vram_mib is None and run.device == "cpu"  # CPU only
        for metric in ("load_s", "rss_base_mib", "ttft_s", "prefill_tok_s"):
            assert math.isfinite(getattr(run, metric)) and getattr(run, metric) > 0, (case.label, metric)
        assert run.peak_rss_mib > run.rss_base_mib and 0 < run.ttft_s <= run.total_s
        assert 150 <= run.prompt_tokens <= 160 and 1 <= run.completion_tokens <= 4
    raw = tiny_report.cases[2].runs[0]
    assert raw.prompt_tokens == 160 and raw.completion_tokens == 4  # raw ignores end-of-generation
    assert raw.decode_tok_s > 0
    assert tiny_report.cases[1].rss_estimate_mib > 0 and tiny_report.cases[0].rss_estimate_mib is None


def test_report_files(tiny_report, tmp_path):
    md, js, png = report.write(tiny_report, tmp_path / "bench")
    table = report.table(tiny_report)
    assert table.count("\n") == 4 and "peak VRAM" not in table  # header, rule, 3 cases; no GPU column
    assert "| llama.cpp raw |" in table and "# molting bench" in md.read_text()
    record = json.loads(js.read_text())
    assert len(record["cases"]) == 3 and record["cases"][0]["summary"]["load_s_median"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_to_raw_uses_the_same_file():
    from molting.bench.measure import Run

    def case(engine, model, decode_s):
        run = Run(1.0, 50.0, 100.0, ttft_s=1.0, total_s=1.0 + decode_s, prompt_tokens=10, completion_tokens=11)
        return Case("m", engine, "Q4_K_M", Job(engine, model), runs=[run])

    mine, raw, other = (
        case("llama.cpp", "a.gguf", 2.0),
        case("llama.cpp raw", "a.gguf", 1.0),
        case("llama.cpp raw", "b.gguf", 4.0),
    )
    result = Report(settings={}, machine={}, cases=[mine, other, raw])
    assert result.raw_ratio(mine) == pytest.approx(0.5)
    assert result.raw_ratio(raw) is None


def _script():
    spec = importlib.util.spec_from_file_location("molting_bench_script", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_script_passes_its_arguments_to_molting_bench_with_its_own_report_path(monkeypatch):
    """The script's options are `molting bench`'s: each one its docstring shows is one the command takes,
    and it adds only its default --out."""
    import re

    from typer.testing import CliRunner

    import molting.cli

    module = _script()
    called = []
    monkeypatch.setattr(molting.cli, "app", lambda argv, standalone_mode: called.append(argv))
    module.main(["--model", "tinyllama-1.1b", "--threads", "2"])
    module.main(["--out", "elsewhere"])
    assert called == [
        ["bench", "--model", "tinyllama-1.1b", "--threads", "2", "--out", str(module.DEFAULT_OUT)],
        ["bench", "--out", "elsewhere"],
    ]
    monkeypatch.undo()
    shown = set(re.findall(r"(--[a-z][a-z-]+)", module.__doc__))
    bench_help = CliRunner().invoke(molting.cli.app, ["bench", "--help"], terminal_width=200).output
    assert shown and all(option in bench_help for option in shown), shown


def test_unexportable_reference_model_is_skipped_before_building(tmp_path, monkeypatch):
    from molting.bench import plan_cases
    from molting.export import architectures

    # An architecture the GGUF writer does not know (phi3 once was one): skipped, nothing built.
    monkeypatch.delitem(architectures._REGISTRY, "Phi3ForCausalLM")
    config = BenchConfig(models=("phi-3-mini",), engines=("llama.cpp",), cache=tmp_path)
    cases, skipped = plan_cases(config, progress=lambda line: None)
    assert cases == [] and len(skipped) == 1 and "Phi3ForCausalLM" in skipped[0]
    assert list(tmp_path.iterdir()) == []  # nothing was built


LLAMA_BENCH_JSON = """[
  {"build_commit": "abc1234", "cpu_info": "fake CPU", "backends": "CPU", "n_threads": 1, "flash_attn": 1,
   "n_prompt": 160, "n_gen": 0, "n_depth": 0, "avg_ts": 1000.0, "stddev_ts": 0.0, "samples_ts": [1000.0]},
  {"n_prompt": 0, "n_gen": 4, "n_depth": 0, "avg_ts": 400.0, "stddev_ts": 0.0, "samples_ts": [400.0]},
  {"n_prompt": 160, "n_gen": 0, "n_depth": 160, "avg_ts": 800.0, "stddev_ts": 0.0, "samples_ts": [800.0]},
  {"n_prompt": 0, "n_gen": 4, "n_depth": 160, "avg_ts": 200.0, "stddev_ts": 0.0, "samples_ts": [200.0]}
]"""


@pytest.fixture
def tiny_gguf(tiny_llama_dir, tmp_path) -> Path:
    from molting.export import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path / "tiny.F16.gguf", outtype="f16")


def test_bench_cli_takes_a_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    """`molting bench --model FILE.gguf`: the file as it is, no transformers case, llama-bench beside it."""
    from typer.testing import CliRunner

    from molting.bench import llamabench
    from molting.cli import app

    fake = tmp_path / "llama-bench"  # prints llama-bench's JSON; records its arguments
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat <<'EOF'\n{LLAMA_BENCH_JSON}\nEOF\n")
    fake.chmod(0o755)
    monkeypatch.setattr(llamabench, "tool_path", lambda name=llamabench.TOOL: fake)
    out = tmp_path / "report"
    args = ["bench", "--model", str(tiny_gguf), "--repeats", "1", "--n-prompt", "160", "--n-new", "4"]
    args += ["--n-ctx", "256", "--threads", "1", "--no-repack", "--out", str(out)]
    result = CliRunner().invoke(app, args, terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "transformers: a GGUF file, no transformers weights" in result.output
    record = json.loads(out.with_suffix(".json").read_text())
    cases = record["cases"]
    assert [(c["engine"], c["weights"], c["model"]) for c in cases] == [
        ("llama.cpp", "F16", str(tiny_gguf)),
        ("llama.cpp raw", "F16", str(tiny_gguf)),
    ]
    called = (tmp_path / "args").read_text().split()
    assert called[called.index("-d") + 1] == "0,160" and called[called.index("-t") + 1] == "1"
    assert called[called.index("-ngl") + 1] == "0" and called[called.index("--repack") + 1] == "0"
    for case in cases:  # prefill over pp160 at depth 0; decode over tg4 at depth 160
        run = case["runs"][0]
        prefill = run["prompt_tokens"] / run["ttft_s"]
        decode = (run["completion_tokens"] - 1) / (run["total_s"] - run["ttft_s"])
        assert case["prefill_vs_llama_bench"] == pytest.approx(prefill / 1000.0)
        assert case["decode_vs_llama_bench"] == pytest.approx(decode / 200.0)
    assert "| 1000.0 | 400.0 | 800.0 | 200.0 |" in out.with_suffix(".md").read_text()


def test_bench_without_llama_bench_says_how_to_build_it(tiny_gguf, tmp_path, monkeypatch):
    from molting.bench import BenchConfig, llamabench, plan_cases, plan_references

    monkeypatch.setattr(llamabench, "tool_path", lambda name=llamabench.TOOL: None)
    config = BenchConfig(models=(str(tiny_gguf),), engines=("llama.cpp", "llama-bench"), cache=tmp_path)
    cases, skipped = plan_cases(config, progress=lambda line: None)
    assert plan_references(config, cases, skipped) == [] and "make llama-bench" in skipped[-1]


def test_bench_resolves_a_run_directory(tiny_llama_dir, tiny_gguf, tmp_path):
    import shutil

    from molting.bench.models import resolve

    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "merged")
    shutil.copy(tiny_gguf, run / "claudio.F16.gguf")
    (run / ".claudio.Q8_0.123.gguf").write_bytes(b"")  # an export in progress is not benched
    model = resolve(str(run), tmp_path)
    assert model.model_dir(tmp_path) == run / "merged" and model.ggufs == (run / "claudio.F16.gguf",)
    with pytest.raises(ConfigError, match="missing.gguf: GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"), tmp_path)
