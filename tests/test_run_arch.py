"""`molting train --base DIR` and `molting run` on TinyLlama- and Phi-3-shaped models."""

from __future__ import annotations

import json

import gguf

from molting.backends import GenerationConfig
from molting.pipeline import RunConfig, run
from molting.train import TrainConfig
from tests.test_pipeline import SilentUI, make_persona


def test_cli_train_with_a_sentencepiece_base(tiny_tinyllama_dir, tmp_path):
    from typer.testing import CliRunner

    from molting.cli import app

    (tmp_path / "persona").mkdir()
    make_persona(tmp_path / "persona")
    args = ["train", str(tmp_path / "persona"), "--out", str(tmp_path / "run"), "--base", str(tiny_tinyllama_dir)]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--r", "2", "--lora-alpha", "4", "--finetuning", "lora"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["base_model"] == str(tiny_tinyllama_dir) and saved["loss"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_tinyllama_dir)


def test_run_on_a_phi3_base_writes_a_phi3_gguf(tiny_phi3_dir, tmp_path):
    (tmp_path / "persona").mkdir()
    persona = make_persona(tmp_path / "persona")
    out = tmp_path / "run"
    config = RunConfig(
        out=out,
        train=TrainConfig(base_model=str(tiny_phi3_dir), num_train_epochs=1, r=4, lora_alpha=8, finetuning="lora"),
        generation=GenerationConfig(max_new_tokens=8),
        quant="F16",
        n_ctx=256,
    )
    result = run(persona, config, SilentUI())

    assert result.gguf == out / "claudio.F16.gguf"
    assert (out / "merged" / "tokenizer.model").is_file()  # SentencePiece export needs it
    reader = gguf.GGUFReader(result.gguf)
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "phi3"
    assert list(result.results) == ["base", "fine-tuned", "GGUF F16"]
    assert "GGUF F16" in result.report.read_text()
