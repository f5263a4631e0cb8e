"""Sampling with spread, the run registry, `molting compare`, retention across targets, report pictures.

Answers are scripted with FakeBackend; no model is loaded.
"""

import contextlib
import json
import statistics
from types import SimpleNamespace

import pytest

from molting import registry
from molting.backends.base import GenerationConfig
from molting.errors import ConfigError
from molting.eval import (
    Judge,
    QuestionResult,
    Rubric,
    RubricResult,
    Sampling,
    compare,
    compare_runs,
    evaluate,
    load_rubric,
    phase_table,
    retention_table,
    rubric_table,
)
from molting.eval.report import score_cell
from molting.eval.targets import evaluate_targets, target_labels, training_config
from molting.persona import Persona
from tests.fakes import PHASE_7 as _PHASE_7
from tests.fakes import PHASE_8 as _PHASE_8
from tests.fakes import FakeBackend

FULL = (
    "O João Figueiredo é desenvolvedor full-stack e meu parceiro de trabalho na Softtor. A gente constrói o CRM juntos."
)
PARTIAL = "O João Figueiredo é desenvolvedor e trabalha muito."
WEAK = "O João é uma pessoa legal que eu conheço bem."
COLLAPSE = "Meu nome é João e eu sou desenvolvedor."


@pytest.fixture(scope="module")
def claudio():
    return Persona.load("examples/claudio")


@pytest.fixture(scope="module")
def joao_only(claudio):
    """Rubric v1.0 cut to its first question, so that scripted answers map one to one."""
    full = load_rubric(claudio)
    return Rubric(full.version, full.questions[:1], full.known_entities)


def run_on(claudio, rubric, answers, label, n=3):
    return evaluate(FakeBackend(answers), claudio, rubric, label=label, sampling=Sampling(n=n))


def test_sampling_asks_greedy_then_seeded_samples(claudio, joao_only):
    backend = FakeBackend([FULL, PARTIAL, WEAK])
    result = evaluate(backend, claudio, joao_only, GenerationConfig(max_new_tokens=50), sampling=Sampling(n=3, seed=7))
    assert [(c.temperature, c.seed) for c in backend.configs] == [(0.0, 0), (0.7, 8), (0.7, 9)]
    assert {c.max_new_tokens for c in backend.configs} == {50} and backend.configs[1].top_p == 0.95
    assert result.sampling == {"n": 3, "temperature": 0.7, "top_p": 0.95, "seed": 7}
    with pytest.raises(ConfigError, match="n must be >= 1"):
        Sampling(n=0)


def test_spread_is_the_standard_deviation_of_the_answers_scores(claudio, joao_only):
    judge = Judge.for_persona(claudio, joao_only)
    expected = [judge.score(joao_only.questions[0], a, "stop").score for a in (FULL, PARTIAL, WEAK)]
    assert len(set(expected)) == 3  # three different scores, so the spread is not 0
    (question,) = run_on(claudio, joao_only, [FULL, PARTIAL, WEAK], "m").questions
    assert [a.score for a in question.answers] == expected
    assert [a.answer for a in question.answers] == [FULL, PARTIAL, WEAK]
    assert question.mean == round(statistics.fmean(expected), 2)
    assert question.spread == round(statistics.stdev(expected), 2) > 0
    assert question.greedy.answer == FULL
    (single,) = run_on(claudio, joao_only, [FULL], "m", n=1).questions
    assert (single.n, single.spread) == (1, 0.0)


def test_a_change_within_the_spread_is_unchanged_and_the_same_change_without_spread_is_not(claudio, joao_only):
    before = run_on(claudio, joao_only, [FULL, FULL, WEAK], "before")
    after = run_on(claudio, joao_only, [FULL, WEAK, WEAK], "after")
    comparison = compare(before, after)
    assert comparison.delta <= -1.0  # well past the 0.5 threshold ...
    assert comparison.verdict == "unchanged" and comparison.band > -comparison.delta  # ... but inside the noise
    assert comparison.rows[0].trend == 0 and "(noise)" in comparison.to_markdown()
    # Negative control: the same means with every answer scoring alike: no spread, so a change.
    judge = Judge.for_persona(claudio, joao_only)
    steady = [_with_scores(before, judge, [before.mean] * 3), _with_scores(after, judge, [after.mean] * 3)]
    assert compare(*steady).verdict == "regression"


def _with_scores(result, judge, scores):
    """A copy of ``result`` whose single question's answers score exactly ``scores``."""
    from dataclasses import replace

    question = result.questions[0]
    answers = [replace(question.answers[0], score=s) for s in scores]
    return RubricResult(result.label, result.version, [QuestionResult(question.id, question.prompt, answers)])


def test_a_real_drop_is_a_regression_and_identity_collapse_in_most_answers_is_named(claudio, joao_only):
    before = run_on(claudio, joao_only, [FULL, FULL, PARTIAL], "fine-tuned")
    after = run_on(claudio, joao_only, [COLLAPSE, COLLAPSE, WEAK], "GGUF")
    comparison = compare(before, after)
    assert comparison.verdict == "regression"
    assert comparison.new_failures == ["Quem é o João?: identity"]
    assert comparison.rows[0].trend == -1
    # One collapsed sample in three is not a new critical failure on its own ...
    once = run_on(claudio, joao_only, [FULL, FULL, COLLAPSE], "GGUF")
    assert compare(before, once).new_failures == []
    assert "(identity)" in rubric_table([before, after]) and "(identity)" not in rubric_table([before, once])
    # ... unless it is the greedy answer, the one Persona.chat gives.
    greedy = run_on(claudio, joao_only, [COLLAPSE, FULL, FULL], "GGUF")
    assert compare(before, greedy).new_failures == ["Quem é o João?: identity"]
    assert compare(before, greedy).verdict == "regression"


def test_results_round_trip_and_old_single_answer_files_still_load(claudio, joao_only):
    result = run_on(claudio, joao_only, [FULL, PARTIAL, WEAK], "m")
    assert RubricResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    old = {
        "label": "base",
        "version": "1.0",
        "scores": [json.loads(json.dumps(result.to_dict()))["questions"][0]["answers"][0]],
    }
    loaded = RubricResult.from_dict(old)
    assert loaded.questions[0].answers[0].answer == FULL and loaded.questions[0].n == 1


def register(root, claudio, rubric, answers, r):
    result = run_on(claudio, rubric, answers, "fine-tuned")
    config = {"train": {"r": r, "lora_alpha": 2 * r}, "sampling": {"n": 3}}
    return registry.record(root, claudio, "run", config, [result], artifacts={"gguf": "x.gguf"}, loss=[])


def test_registry_records_config_hashes_versions_and_answers(tmp_path, claudio, joao_only):
    entry = register(tmp_path, claudio, joao_only, [FULL, PARTIAL, WEAK], r=8)
    saved = json.loads((entry.root / "entry.json").read_text())
    assert entry.root.parent == tmp_path and entry.id.endswith("-claudio-run")
    assert saved["config"]["train"]["r"] == 8 and saved["primary"] == "fine-tuned"
    assert len(saved["hashes"]["dataset_sha256"]) == 64 and saved["versions"]["python"]
    assert (entry.root / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = registry.load(entry.id, tmp_path)
    result = loaded.result()
    assert result.label == "fine-tuned" and [a.answer for a in result.questions[0].answers] == [FULL, PARTIAL, WEAK]
    assert registry.load(entry.root).id == entry.id  # by path too
    assert register(tmp_path, claudio, joao_only, [FULL], r=8).id != entry.id  # same second: a new id
    with pytest.raises(ConfigError, match="no registered run 'nope'"):
        registry.load("nope", tmp_path)
    with pytest.raises(ConfigError, match=r"has results \['fine-tuned'\]; asked for 'GGUF'"):
        loaded.result("GGUF")


def test_compare_over_three_registered_runs_prints_the_phase_table_and_a_verdict(tmp_path, claudio):
    from typer.testing import CliRunner

    from molting.cli import app

    rubric = load_rubric(claudio)
    # evaluate asks every question once per decoding: greedy answers first, then each sample.
    good = list(_PHASE_7) * 3
    mixed = [*_PHASE_7, *_PHASE_8, *_PHASE_7]
    bad = list(_PHASE_8) * 3
    entries = [register(tmp_path, claudio, rubric, answers, r) for answers, r in ((good, 8), (mixed, 16), (bad, 32))]
    out = tmp_path / "compare.md"
    args = ["compare", *(e.id for e in entries), "--runs", str(tmp_path), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert f"| question | {entries[0].id} | {entries[1].id} | {entries[2].id} | trend |" in text
    assert "| train.r | 8 | 16 | 32 |" in text and "dataset_sha256" not in text  # only what changed
    first, middle, last = (e.result().by_id()["sobre-voce"] for e in entries)
    assert middle.spread > 0 and middle.failure_share("identity") == 1 / 3  # one collapsed answer in three: no flag
    cells = f"{score_cell(first)} | {score_cell(middle)} | {score_cell(last)} (identity)"
    assert f"| Me fala sobre você | {cells} | {round(last.mean - middle.mean, 1):+g} |" in text
    assert text.rstrip().splitlines()[-1].startswith(f"Best run: {entries[0].id}")
    assert f"Verdict: **REGRESSION**: {entries[2].id}" in text.rstrip().splitlines()[-1]
    verdict = text.split("## Verdict")[1]
    assert verdict.count("**REGRESSION**") == 3  # two steps, and the closing verdict
    assert "REGRESSION" in result.output and entries[2].id in result.output
    missing = CliRunner().invoke(app, ["compare", entries[0].id, "nope", "--runs", str(tmp_path)])
    assert missing.exit_code == 2 and "no registered run 'nope'" in missing.output
    alone = CliRunner().invoke(app, ["compare", entries[0].id, "--runs", str(tmp_path)])
    assert alone.exit_code == 2 and "holds 1 result(s): give two runs or more" in " ".join(alone.output.split())


def test_phase_table_trend_is_equal_within_noise_and_signed_beyond(claudio, joao_only):
    a = run_on(claudio, joao_only, [FULL, FULL, FULL], "p7")
    b = run_on(claudio, joao_only, [WEAK, WEAK, WEAK], "p8")
    c = run_on(claudio, joao_only, [WEAK, FULL, WEAK], "p9")
    table = phase_table([a, b, c])
    assert table.splitlines()[0] == "| question | p7 | p8 | p9 | trend |"
    assert table.splitlines()[2].endswith("| = |")  # p9 vs p8: +2 but within p9's spread
    assert phase_table([a, b]).splitlines()[2].endswith(f"| {round(b.mean - a.mean, 1):+g} |")
    with pytest.raises(ValueError, match="at least two runs"):
        phase_table([a])
    assert "Best run: p7" in compare_runs([a, b, c])


def test_retention_over_several_targets_flags_the_questions_that_changed(claudio):
    rubric = load_rubric(claudio)
    answers = list(_PHASE_7) * 3  # greedy answers, then each sample's
    q4 = list(answers)
    q4[4::8] = ["Meu nome é João. Sou o João."] * 3  # "Me fala sobre você" (question 5 of 8) collapses in Q4_K_M
    scripted = {"fine-tuned": answers, "GGUF F16": answers, "GGUF Q8_0": answers, "GGUF Q4_K_M": q4}
    openers = {label: (lambda a=a: FakeBackend(a)) for label, a in scripted.items()}
    results = evaluate_targets(claudio, rubric, openers, GenerationConfig(), Sampling(n=3), _SilentUI())
    assert [r.label for r in results] == list(scripted)
    table = retention_table(results)
    lines = table.splitlines()
    assert lines[0] == "| question | fine-tuned | GGUF F16 | GGUF Q8_0 | GGUF Q4_K_M |"
    assert "| **retention** | 100% | 100% | 100% |" in table
    retention = results[3].mean / results[0].mean
    assert f"| {retention:.0%} |" in table and retention < 0.95
    assert "| **verdict** | reference | UNCHANGED | UNCHANGED | REGRESSION |" in table
    row = next(line for line in lines if line.startswith("| Me fala sobre você"))
    assert row.endswith("(identity) ▼ |") and row.count("▼") == 1
    assert "- GGUF Q4_K_M: Me fala sobre você 10.0 ± 0.0 → " in table
    assert "- GGUF Q4_K_M: Me fala sobre você: identity newly fails" in table
    assert table.count("- GGUF") == 2  # F16 and Q8_0 changed nothing


def test_training_config_is_found_beside_an_adapter_a_merged_model_or_a_gguf(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"config": {"r": 8, "num_train_epochs": 1}}))
    for model in (tmp_path, tmp_path / "adapter", tmp_path / "merged", tmp_path / "c.Q4_K_M.gguf"):
        assert training_config(model) == {"r": 8, "num_train_epochs": 1}
    assert training_config("smollm2-135m") is None and training_config(tmp_path / "adapter" / "x" / "y") is None


def test_target_labels_name_gguf_quants_and_reject_a_wrong_label_count():
    models = ["runs/c/merged", "runs/c/claudio.F16.gguf", "runs/c/claudio.Q4_K_M.gguf", "smollm2-135m", "x/merged"]
    assert target_labels(models) == ["merged", "GGUF F16", "GGUF Q4_K_M", "smollm2-135m", "merged #2"]
    assert target_labels(models[:2], ["ft", "f16"]) == ["ft", "f16"]
    with pytest.raises(ConfigError, match="one distinct label per --model"):
        target_labels(models[:2], ["ft"])


def test_cli_eval_over_several_targets_prints_retention_and_registers(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import molting.backends
    from molting.cli import app

    collapsed = list(_PHASE_7)
    collapsed[4] = "Meu nome é João. Sou o João."
    scripted = {"runs/c/merged": _PHASE_7, "runs/c/claudio.Q4_K_M.gguf": collapsed}
    opened = []

    def fake_load_backend(model, **options):
        opened.append(model)
        return FakeBackend(list(scripted[model]) * 2)  # 2 answers per question, asked question by question

    monkeypatch.setattr(molting.backends, "load_backend", fake_load_backend)
    args = ["eval", "examples/claudio", *(x for m in scripted for x in ("--model", m)), "--samples", "2"]
    result = CliRunner().invoke(app, [*args, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert opened == list(scripted)
    assert "retention against merged" in result.output and "REGRESSION" in result.output
    (entry_dir,) = registry.list_ids(tmp_path / "runs")
    entry = registry.load(entry_dir)
    assert entry.kind == "eval" and entry.labels == ["merged", "GGUF Q4_K_M"] and entry.primary == "merged"
    assert entry.config["models"] == {"merged": "runs/c/merged", "GGUF Q4_K_M": "runs/c/claudio.Q4_K_M.gguf"}
    assert entry.config["sampling"]["n"] == 2 and entry.config["generation"]["max_new_tokens"] == 200
    picked = registry.comparison([f"{entry.id}:merged", f"{entry.id}:GGUF Q4_K_M"], tmp_path / "runs")
    assert f"| question | {entry.id}:merged | {entry.id}:GGUF Q4_K_M | trend |" in picked
    assert "**REGRESSION**" in picked.split("## Verdict")[1]
    with pytest.raises(ConfigError, match=r"has results \['merged', 'GGUF Q4_K_M'\]; asked for 'Q8_0'"):
        registry.comparison([f"{entry.id}:merged", f"{entry.id}:Q8_0"], tmp_path / "runs")
    retention = registry.comparison([entry.id], tmp_path / "runs")  # the same table, from the registry
    assert (
        retention.startswith("| question | merged | GGUF Q4_K_M |")
        and "| **verdict** | reference | REGRESSION |" in retention
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in saved] == ["merged", "GGUF Q4_K_M"]
    assert [len(q["answers"]) for q in saved[1]["questions"]] == [2] * 8
    # the held-out probes beside the rubric: every probe of both splits asked of every model, test first
    assert result.output.index("TEST probes: the headline") < result.output.index("dev probes: used to choose")
    asked = [[(p["split"], p["system_prompt"], p["asked"]) for p in r["probes"]] for r in saved]
    assert asked == [[("test", True, 37), ("dev", True, 35)]] * 2


class _SilentUI:
    def step(self, title):
        pass

    @contextlib.contextmanager
    def bar(self, title, total):
        yield lambda done, total=None: None


def test_report_pictures_are_pngs(tmp_path, claudio, joao_only):
    from molting.plots import loss_chart, scores_chart
    from molting.run_report import run_report

    results = {
        "base": run_on(claudio, joao_only, [WEAK, PARTIAL, WEAK], "base"),
        "fine-tuned": run_on(claudio, joao_only, [FULL, PARTIAL, FULL], "fine-tuned"),
    }
    loss = [{"step": i, "loss": 3.0 - 0.1 * i} for i in range(1, 11)]
    budget = {
        "system_prompt_tokens": 10,
        "max_length": 512,
        "room_after_system_prompt": 502,
        "tokens_min": 20,
        "tokens_median": 30,
        "tokens_max": 40,
        "examples": 4,
        "truncated_examples": 0,
        "truncated": [],
    }
    record = SimpleNamespace(
        loss=loss,
        budget=budget,
        device="cpu",
        quantization="none",
        train_seconds=1,
        peak_memory_mb=1,
        peak_memory_kind="rss",
        dpo=[
            {"step": 1, "loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
            {"step": 2, "loss": 0.52, "rewards/margins": 0.41, "rewards/accuracies": 0.75},
        ],
        dpo_seconds=1,
    )
    train_config = dict.fromkeys(
        (
            "base_model",
            "r",
            "lora_alpha",
            "lora_dropout",
            "num_train_epochs",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "method",
            "beta",
            "dpo_epochs",
            "dpo_learning_rate",
        ),
        1,
    )
    generation = {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 200}
    text = run_report(
        persona=claudio,
        train_config=train_config,
        generation=generation,
        record=record,
        results=results,
        gguf=tmp_path / "c.Q4_K_M.gguf",
        llama_cli="llama-cli",
        out=tmp_path,
    )
    assert (
        "![training loss per step](loss.png)" in text and "![rubric score per question and model](scores.png)" in text
    )
    assert "each question answered 3 times" in text and "•" not in text  # no hand-drawn chart left
    assert "## Preference training (DPO)" in text and "| 2 | 0.5200 | 0.410 | 0.75 |" in text
    for name in ("loss.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(tmp_path / "scores.png").shape[1] > imread(tmp_path / "loss.png").shape[1] * 0.5
    with pytest.raises(ValueError, match="no loss"):
        loss_chart([], tmp_path / "none.png")
    with pytest.raises(ValueError, match="no results"):
        scores_chart([], tmp_path / "none.png")


