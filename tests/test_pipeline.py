"""`molting run` end to end on a tiny random llama: every artifact written, the report complete."""

import contextlib
import json

import pytest
import yaml

from molting import registry
from molting.backends import GenerationConfig
from molting.errors import ConfigError
from molting.eval.report import compare_runs
from molting.persona import Persona
from molting.pipeline import RunConfig, llama_cli_command, run
from molting.train import TrainConfig


class SilentUI:
    def __init__(self):
        self.steps = []

    def step(self, title):
        self.steps.append(title)

    @contextlib.contextmanager
    def bar(self, title, total):
        yield lambda done, total=None: None

    def table(self, result):
        self.steps.append(f"table {result.label}")

    def budget(self, report):
        self.steps.append(f"budget {report.summary()['examples']} examples")

    def verify(self, report):
        self.steps.append(f"verify {[f.quant for f in report.files]}")
        self.check = report
    def lint(self, findings):
        self.steps.append(f"lint {len(findings)} findings")


def make_persona(tmp_path):
    spec = {
        "name": "Cláudio",
        "language": "pt",
        "identity": ["Sou o Cláudio."],
        "traits": ["curioso"],
        "forbidden_identities": ["João"],
        "train_system_prompt": "Você é o Cláudio.",
        "system_prompt": "Você é o Cláudio, IA da Softtor.",
    }
    rubric = {
        "version": "1.0",
        "questions": [
            {"id": "joao", "prompt": "Quem é o João?", "facts": [["parceiro"]], "wrong": [["meu filho"]]},
            {"id": "voce", "prompt": "Me fala sobre você", "facts": [["Cláudio"]], "wrong": []},
        ],
    }
    (tmp_path / "persona.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    (tmp_path / "rubric.yaml").write_text(yaml.safe_dump(rubric, allow_unicode=True), encoding="utf-8")
    row = {"messages": [{"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Oi, sou o Cláudio."}]}
    (tmp_path / "dataset.jsonl").write_text("\n".join([json.dumps(row, ensure_ascii=False)] * 4), encoding="utf-8")
    return Persona.load(tmp_path)


def test_run_writes_every_artifact(tiny_llama_256_dir, tmp_path):
    (tmp_path / "persona").mkdir()
    probe = {"id": "name", "kind": "name", "prompt": "Como você se chama?", "expect": [["Cláudio"]]}
    (tmp_path / "persona" / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe]}), encoding="utf-8")
    test_probe = {"id": "t-name", "kind": "name", "prompt": "Com quem eu falo?", "expect": [["Cláudio"]]}
    test_file = tmp_path / "persona" / "probes-test.yaml"
    test_file.write_text(yaml.safe_dump({"probes": [test_probe]}), encoding="utf-8")
    identity = {"say": "Quem é você?", "kind": "identity", "expect": [["Cláudio"]]}
    script = {"id": "c", "turns": ["Bom dia"] * 7 + [identity]}
    conversations = yaml.safe_dump({"conversations": [script]}, allow_unicode=True)
    (tmp_path / "persona" / "conversations.yaml").write_text(conversations, encoding="utf-8")
    persona = make_persona(tmp_path / "persona")
    out = tmp_path / "run"
    config = RunConfig(
        out=out,
        train=TrainConfig(base_model=str(tiny_llama_256_dir), num_train_epochs=1, r=4, lora_alpha=8, finetuning="lora"),
        generation=GenerationConfig(max_new_tokens=8),
        quant="Q8_0",
        n_ctx=256,
        registry=tmp_path / "runs",
        drift_max_new_tokens=4,
    )
    ui = SilentUI()
    result = run(persona, config, ui)

    assert result.gguf == out / "claudio.Q8_0.gguf" and result.gguf.stat().st_size > 0
    assert not (out / "claudio.F16.gguf").exists()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert list(result.results) == ["base", "fine-tuned", "GGUF Q8_0"]
    for name in ("base", "finetuned", "gguf"):
        saved = json.loads((out / "eval" / f"{name}.json").read_text())
        assert [len(q["answers"]) for q in saved["questions"]] == [3, 3]  # greedy + 2 samples by default
    report = result.report.read_text()
    for needle in ("Token budget", "## Loss", "base", "fine-tuned", "GGUF Q8_0", "llama-cli -m", "Quem é o João?"):
        assert needle in report
    for picture in ("loss.png", "scores.png", "drift.png"):
        assert f"]({picture})" in report and (out / picture).read_bytes()[:4] == b"\x89PNG"
    entry = json.loads((result.entry / "entry.json").read_text())
    assert result.entry.parent == tmp_path / "runs" and entry["kind"] == "run" and entry["primary"] == "fine-tuned"
    assert [r["label"] for r in entry["results"]] == ["base", "fine-tuned", "GGUF Q8_0"]
    assert entry["config"]["train"]["r"] == 4 and len(entry["loss"]) > 0
    assert 'SYSTEM """Você é o Cláudio, IA da Softtor."""' in (out / "Modelfile").read_text()
    assert ui.steps.index("budget 4 examples") < next(i for i, s in enumerate(ui.steps) if "Training" in s)
    assert any("Quantizing" in s for s in ui.steps) and "table GGUF Q8_0" in ui.steps
    # the export's behaviour check: printed, saved beside the file, and in the report
    assert "verify ['F16', 'Q8_0']" in ui.steps
    assert result.check.get("F16").top1 >= 0.99 and result.check.get("Q8_0").stop.replies == 2
    saved = json.loads((out / "claudio.Q8_0.verify.json").read_text())
    assert [f["quant"] for f in saved["files"]] == ["F16", "Q8_0"]
    assert "## Export check" in report and result.check.to_markdown() in report
    # both probe splits, test first, on every model; on the GGUF also without the system prompt (its
    # template carries it); the test split's rate heads the report
    probed = {label: [(p.split, p.system_prompt) for p in r.probes] for label, r in result.results.items()}
    both = [("test", True), ("dev", True)]
    gguf = [("test", True), ("test", False), ("dev", True), ("dev", False)]
    assert probed == {"base": both, "fine-tuned": both, "GGUF Q8_0": gguf}
    assert report.index("test probes (the headline): base") < report.index("## Training")
    assert report.index("## Test probes (the headline)") < report.index("## Dev probes")
    assert "| **all** |" in report and "GGUF Q8_0 (no system prompt)" in report
    # the held-out conversation on every model: greedy and one sample, 8 turns each; saved, reported, compared
    assert {label: [len(c.outcomes) for run in r.drift.runs for c in run] for label, r in result.results.items()} == {
        "base": [8, 8],
        "fine-tuned": [8, 8],
        "GGUF Q8_0": [8, 8],
    }
    assert "## Drift: held-out conversations" in report and "| identity lost (greedy) |" in report
    assert "(drift): GGUF Q8_0 holds" in report
    registered = registry.load(result.entry)
    saved = [registered.result(label) for label in registered.labels]
    assert [len(r.drift.runs) for r in saved] == [2, 2, 2]
    compared = compare_runs(saved)
    assert "## Drift: held-out conversations" in compared and "(drift): GGUF Q8_0 holds" in compared


def test_run_can_judge_the_gguf_alone_and_fine_tunes_a_small_model_fully(tiny_llama_256_dir, tmp_path):
    """finetuning "auto" on a model this small trains every weight: model/, no adapter, no merge."""
    (tmp_path / "persona").mkdir()
    persona = make_persona(tmp_path / "persona")
    config = RunConfig(
        out=tmp_path / "run",
        train=TrainConfig(base_model=str(tiny_llama_256_dir), num_train_epochs=1),
        generation=GenerationConfig(max_new_tokens=4),
        quant="Q8_0",
        n_ctx=256,
        verify=None,
        models=("gguf",),
        registry=tmp_path / "runs",
    )
    result = run(persona, config, SilentUI())
    assert list(result.results) == ["GGUF Q8_0"]
    entry = json.loads((result.entry / "entry.json").read_text())
    assert entry["primary"] == "GGUF Q8_0"
    assert (entry["config"]["train"]["finetuning"], entry["config"]["train"]["learning_rate"]) == ("full", 1e-4)
    assert result.adapter == tmp_path / "run" / "model" and (result.adapter / "config.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "merged").exists()
    assert "CPU, full fine-tuning (every weight, fp32)" in result.report.read_text()
    with pytest.raises(ConfigError, match="choose among"):
        RunConfig(models=("merged",))


def test_llama_cli_command_carries_the_decoding():
    from pathlib import Path

    command = llama_cli_command(
        Path("runs/x/x.Q4_K_M.gguf"), GenerationConfig(max_new_tokens=99, repetition_penalty=1.3)
    )
    assert command == "llama-cli -m runs/x/x.Q4_K_M.gguf --jinja -cnv --temp 0 --repeat-penalty 1.3 -n 99"


def test_cli_export_writes_only_the_quantized_gguf(tiny_llama_256_dir, tmp_path):
    import gguf
    from typer.testing import CliRunner

    from molting.cli import app
    from tests.test_merge import make_adapter

    (tmp_path / "persona").mkdir()
    make_persona(tmp_path / "persona")
    make_adapter(tiny_llama_256_dir, tmp_path / "adapter")
    out = tmp_path / "gguf" / "claudio.Q8_0.gguf"
    out.parent.mkdir()
    args = ["export", str(tmp_path / "persona"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--quant", "Q8_0", "--base", str(tiny_llama_256_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["claudio.Q8_0.gguf", "claudio.Q8_0.verify.json"]
    assert "same top-1" in result.output
    prompt = gguf.GGUFReader(out).fields["molting.system_prompt"]
    assert bytes(prompt.parts[prompt.data[0]]).decode() == "Você é o Cláudio, IA da Softtor."


def test_export_leaves_a_users_f16_beside_the_target_alone(tiny_llama_256_dir, tmp_path):
    """A quantized export writes its F16 intermediate under a private name: an earlier export's
    ``claudio.F16.gguf`` in the same directory is neither overwritten nor removed."""
    from typer.testing import CliRunner

    from molting.cli import app
    from tests.test_merge import make_adapter

    (tmp_path / "persona").mkdir()
    make_persona(tmp_path / "persona")
    make_adapter(tiny_llama_256_dir, tmp_path / "adapter")
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "claudio.F16.gguf").write_bytes(b"an earlier export")
    args = ["export", str(tmp_path / "persona"), "--adapter", str(tmp_path / "adapter")]
    result = CliRunner().invoke(
        app, [*args, "--out", str(out / "claudio.Q8_0.gguf"), "--quant", "Q8_0", "--no-verify", "--base",
              str(tiny_llama_256_dir)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["claudio.F16.gguf", "claudio.Q8_0.gguf"]
    assert (out / "claudio.F16.gguf").read_bytes() == b"an earlier export"


def test_cli_export_takes_a_fully_fine_tuned_model_as_it_is(tiny_llama_256_dir, tmp_path):
    """`--adapter runs/x/model` (finetuning full): no merge, the model's own weights in the GGUF;
    `--adapter-only` is refused, naming the directory."""
    import gguf
    from typer.testing import CliRunner

    from molting.cli import app

    (tmp_path / "persona").mkdir()
    make_persona(tmp_path / "persona")
    out = tmp_path / "claudio.F16.gguf"
    args = ["export", str(tmp_path / "persona"), "--adapter", str(tiny_llama_256_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--quant", "F16", "--no-verify"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Merging" not in result.output and out.is_file()
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    refused = CliRunner().invoke(app, [*args, "--adapter-only", "--force"], terminal_width=200)
    assert refused.exit_code == 2 and f"{tiny_llama_256_dir}: a fully fine-tuned model" in refused.output
