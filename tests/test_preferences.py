import json
import math
from dataclasses import replace

import pytest

from molting.errors import ConfigError, DatasetError
from molting.lint import lint_preferences
from molting.preferences import load_preferences


def pair(prompt, chosen, rejected, kind=None):
    row = {
        "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    return row if kind is None else {**row, "kind": kind}


GOOD = pair("Quem trabalha contigo?", "Trabalho com o João Figueiredo.", "Eu sou o João.", "role-swap")


def write(tmp_path, lines: list[str | bytes], name="preferences.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return path


def test_loads_pairs_in_trl_format_with_the_system_prompt_first(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD, ensure_ascii=False), "", json.dumps(pair("Oi", "Olá!", "Sou o ChatGPT."))])
    pairs = load_preferences(path)
    assert [(p.line, p.kind) for p in pairs] == [(1, "role-swap"), (3, None)]
    assert pairs[0].row("Você é o Cláudio.") == {
        "prompt": [{"role": "system", "content": "Você é o Cláudio."}, *GOOD["prompt"]],
        "chosen": GOOD["chosen"],
        "rejected": GOOD["rejected"],
    }


def _with(**changes):
    return json.dumps({**GOOD, **changes}, ensure_ascii=False)


USER, ASSISTANT = {"role": "user", "content": "Oi"}, {"role": "assistant", "content": "Olá!"}


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ('{"prompt": [', None, "invalid JSON"),
        ("[1, 2]", None, "expected an object"),
        (_with(score=3), "score", "unknown key"),
        (_with(prompt="Oi"), "prompt", "non-empty list"),
        (_with(prompt=[]), "prompt", "non-empty list"),
        (_with(prompt=[{"role": "bot", "content": "x"}]), "prompt[0].role", "unknown role 'bot'"),
        (_with(prompt=[USER, {"role": "system", "content": "x"}, USER]), "prompt[1].role", "only come first"),
        (_with(prompt=[USER, ASSISTANT]), "prompt[1].role", "end with a user turn"),
        (_with(prompt=[{"role": "user", "content": " "}]), "prompt[0].content", "empty"),
        ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen", "exactly one assistant turn"),
        (_with(chosen=[ASSISTANT, ASSISTANT]), "chosen", "exactly one assistant turn"),
        (_with(chosen=[USER]), "chosen[0].role", "unknown role 'user'"),
        (_with(rejected=[{"role": "assistant", "content": ""}]), "rejected[0].content", "empty"),
        (_with(rejected=[{"role": "assistant", "content": " Trabalho com o João Figueiredo. "}]), "rejected", "same"),
        (_with(kind="rude"), "kind", "unknown kind 'rude'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, field, words):
    line = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), line])
    with pytest.raises(DatasetError) as info:
        load_preferences(path)
    assert (info.value.line, info.value.field) == (3, field)
    assert f"{path}:3:" in str(info.value) and words in str(info.value)


def test_missing_empty_and_not_utf8_files(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no preference pairs"):
        load_preferences(write(tmp_path, ["", ""]))
    with pytest.raises(DatasetError, match=r":2: not UTF-8"):
        load_preferences(write(tmp_path, [json.dumps(GOOD), b'{"prompt": "\xff"}']))


def test_a_windows_file_with_bom_and_crlf_reads_as_it_is(tmp_path):
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in (GOOD, GOOD)) + "\r\n"
    path = tmp_path / "preferences.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    pairs = load_preferences(path)
    assert [p.line for p in pairs] == [1, 2] and pairs[0].chosen == "Trabalho com o João Figueiredo."


PLANTED = {
    2: ("template-tokens", pair("Como vai?", "Bem!<|im_end|>", "Sou o ChatGPT.")),
    3: ("identity", pair("E você, quem é de verdade?", "Eu sou o João, da Softtor.", "Sou o Cláudio.")),
    4: ("identity", pair("E o João?", "O João é meu pai.", "Sou o João.")),  # a persona-wide wrong statement
    5: ("rubric-question", pair("quem e o joao", "O João Figueiredo é meu parceiro.", "Eu sou o João.")),
    6: ("duplicate", GOOD),
    # An assistant turn of the prompt is read too: the model is conditioned on it.
    7: ("identity", pair([USER, {"role": "assistant", "content": "Sou o ChatGPT."}, USER], "Oi de novo!", "Oi.")),
}


def test_lint_finds_every_planted_defect_in_chosen_and_never_reads_rejected(tmp_path):
    rows = [GOOD, *(row for _, row in PLANTED.values())]
    path = write(tmp_path, [json.dumps(r, ensure_ascii=False) for r in rows])
    wrong = [["meu pai", "meu filho"]]
    findings = lint_preferences(path, "pt", ["João", "ChatGPT"], ["Cláudio"], ["Quem é o João?"], wrong)
    assert sorted((f.line, f.check) for f in findings) == sorted((line, c) for line, (c, _) in PLANTED.items())
    by_line = {f.line: f for f in findings}
    assert str(by_line[3]).startswith(f"{path}:3: error [identity] chosen[0]: claims to be João")
    assert "prompt[0]: rubric question 'Quem é o João?'" in by_line[5].message
    assert by_line[6].severity == "warning" and "repeats line 1" in by_line[6].message
    assert by_line[7].message.startswith("prompt[1]: claims to be ChatGPT")


def test_pair_budget_counts_the_longer_answer_and_truncation_is_a_warning(tmp_path, tiny_tokenizer):
    from molting.data import token_budget
    from molting.preferences import preference_budget

    long = pair("Oi", "Olá!", "Era uma vez um compilador. " * 20)
    path = write(tmp_path, [json.dumps(r, ensure_ascii=False) for r in (GOOD, long)])
    pairs = load_preferences(path)
    rendered = [GOOD["prompt"] + GOOD["chosen"], GOOD["prompt"] + GOOD["rejected"], long["prompt"] + long["rejected"]]
    counts = token_budget(tiny_tokenizer, rendered, "Você é o Cláudio.", 10_000).lengths
    budget = preference_budget(tiny_tokenizer, pairs, "Você é o Cláudio.", max_length=counts[2] - 1)
    assert budget.lengths == [max(counts[0], counts[1]), counts[2]] and budget.over == [(2, 1)]
    findings = lint_preferences(path, "pt", budget=budget)
    assert [(f.line, f.check, f.severity) for f in findings] == [(2, "truncated", "warning")]
    assert "1 tokens over max_length" in findings[0].message


def test_persona_reads_and_lints_its_preferences(tmp_path):
    import shutil

    from molting.lint import lint_persona
    from molting.persona import Persona

    persona_dir = tmp_path / "claudio"
    shutil.copytree("examples/claudio", persona_dir)
    persona = Persona.load(persona_dir)
    assert len(persona.preferences) >= 40 and lint_persona(persona) == []
    with (persona_dir / "preferences.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("\n" + json.dumps(PLANTED[3][1], ensure_ascii=False) + "\n")
    findings = lint_persona(Persona.load(persona_dir))
    assert [(f.path.name, f.check) for f in findings] == [("preferences.jsonl", "identity")]


# ---- DPO on a tiny model -------------------------------------------------------------------

PAIRS = [
    pair("Quem trabalha contigo?", "Trabalho com o João.", "Eu sou o João."),
    pair("Te confundem com outros?", "Sou o Cláudio.", "Sou o ChatGPT."),
    pair("O que te move?", "A curiosidade.", "O João é uma IA."),
    pair("Como você ajuda?", "Penso junto com o João.", "Eu sou o CRM, eu sou o CRM."),
]
BETA = 0.5


def tiny_persona(root, preferences=True):
    from tests.test_train import tiny_persona as sft_persona

    persona = sft_persona(root, n=4)
    if preferences:
        path = write(root, [json.dumps(p, ensure_ascii=False) for p in PAIRS])
        persona.preferences = load_preferences(path)
    return persona


def tiny_config(model_dir, method):
    from molting.train import TrainConfig

    return TrainConfig(
        base_model=str(model_dir), method=method, num_train_epochs=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, r=4, lora_alpha=8, learning_rate=1e-2,
        beta=BETA, dpo_epochs=3, dpo_learning_rate=1e-2, finetuning="lora",
    )


def margins(model, tokenizer, persona) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair, in nats, tokenized as TRL does."""
    import torch

    out = []
    for preference in persona.preferences:
        row = preference.row(persona.train_system_prompt)
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        logps = []
        for answer in (row["chosen"], row["rejected"]):
            ids = tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=True, return_dict=True)["input_ids"]
            assert ids[: len(prompt)] == prompt
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(ids[1:])
            logps.append(logits.gather(1, targets[:, None])[len(prompt) - 1 :].sum().item())
        out.append(logps[0] - logps[1])
    return out


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """The same SFT run alone and followed by DPO (same seed, so the same SFT adapter)."""
    from molting.train import train

    root = tmp_path_factory.mktemp("dpo")
    persona = tiny_persona(root)
    steps = []
    runs = {m: root / m for m in ("sft", "dpo")}
    records = {m: train(persona, runs[m], tiny_config(tiny_llama_dir, m)) for m in ("sft",)}
    records["dpo"] = train(persona, runs["dpo"], tiny_config(tiny_llama_dir, "dpo"),
                           on_step=lambda s, n, logs: steps.append((s, n)))
    return persona, runs, records, steps


def _load(model_dir, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def test_dpo_raises_the_chosen_over_rejected_margin_of_the_sft_model(trained, tiny_llama_dir, tiny_tokenizer):
    persona, runs, records, steps = trained
    sft = margins(_load(tiny_llama_dir, runs["sft"] / "adapter"), tiny_tokenizer, persona)
    dpo = margins(_load(tiny_llama_dir, runs["dpo"] / "adapter"), tiny_tokenizer, persona)
    gains = [d - s for d, s in zip(dpo, sft, strict=True)]
    assert all(g > 1.0 for g in gains), gains  # nats, per pair
    assert records["sft"].loss == records["dpo"].loss  # the DPO run's SFT phase is the SFT run
    assert records["sft"].dpo == [] and records["sft"].dpo_seconds == 0


def test_the_dpo_reference_is_the_sft_model_not_the_base(trained, tiny_llama_dir, tiny_tokenizer):
    """With the SFT model as reference, policy == reference at the first step: loss log 2, margin 0.
    The bare base as reference (negative control, computed here) would give another first loss."""
    import torch

    persona, runs, records, _ = trained
    first = records["dpo"].dpo[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-4)
    sft_model = _load(tiny_llama_dir, runs["sft"] / "adapter")
    with sft_model.disable_adapter():
        base = margins(sft_model, tiny_tokenizer, persona)
    sft = margins(sft_model, tiny_tokenizer, persona)
    # The first step's batch is 2 of the 4 pairs (shuffled): every pair's loss against the base must
    # be far from log 2 for the control to hold whichever 2 came first.
    losses = [-torch.nn.functional.logsigmoid(torch.tensor(BETA * (s - b))).item() for s, b in zip(sft, base,
                                                                                                   strict=True)]
    assert all(abs(loss - math.log(2)) > 0.05 for loss in losses), losses


def test_dpo_record_and_one_adapter_directory(trained):
    _, runs, records, steps = trained
    dpo = records["dpo"]
    # 4 examples / batch 2 x 2 epochs of SFT, then 4 pairs / batch 2 x 3 epochs of DPO.
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4), (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    assert [e["step"] for e in dpo.dpo] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "rewards/margins", "rewards/accuracies", "learning_rate"} <= set(dpo.dpo[0])
    assert dpo.dpo[-1]["rewards/margins"] > 0 and dpo.dpo[-1]["loss"] < math.log(2)
    assert 0 < dpo.dpo_seconds <= dpo.train_seconds
    saved = json.loads((runs["dpo"] / "run.json").read_text())
    assert saved["config"]["method"] == "dpo" and saved["dpo"] == dpo.dpo
    adapter = runs["dpo"] / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in (runs["sft"] / "adapter").iterdir())
    assert not (adapter / "ref").exists()


def test_dpo_continues_a_saved_sft_adapter_as_the_same_run_would(trained, tiny_llama_dir, tmp_path):
    """sft_adapter: the SFT run's saved adapter, continued by DPO alone, takes the DPO steps the
    SFT-then-DPO run took (same reference, same data order)."""
    from molting.train import train

    persona, runs, records, _ = trained
    config = replace(tiny_config(tiny_llama_dir, "dpo"), sft_adapter=str(runs["sft"] / "adapter"))
    record = train(persona, tmp_path / "continued", config)
    assert record.loss == [] and record.config["sft_adapter"] == str(runs["sft"] / "adapter")
    assert [e["loss"] for e in record.dpo] == pytest.approx([e["loss"] for e in records["dpo"].dpo], rel=1e-4)
    assert (tmp_path / "continued" / "adapter" / "adapter_config.json").is_file()


def test_sft_adapter_needs_dpo_and_the_same_base(trained, tiny_llama_dir, tmp_path):
    import shutil

    from molting.train import TrainConfig, train

    persona, runs, _, _ = trained
    with pytest.raises(ConfigError, match="sft_adapter .* needs method='dpo'"):
        TrainConfig(sft_adapter=str(runs["sft"] / "adapter"))
    other = tmp_path / "other-base"
    shutil.copytree(runs["sft"] / "adapter", other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"other-base/adapter_config.json: trained on .*, not on"):
        train(persona, tmp_path / "run", replace(tiny_config(tiny_llama_dir, "dpo"), sft_adapter=str(other)))
    assert not (tmp_path / "run").exists()


def test_dpo_without_preferences_names_the_missing_file(tiny_llama_dir, tmp_path):
    from molting.train import TrainConfig, train

    with pytest.raises(ConfigError, match=r"method 'dpo' needs preference pairs: .*preferences.jsonl not found"):
        train(tiny_persona(tmp_path, preferences=False), tmp_path / "run", tiny_config(tiny_llama_dir, "dpo"))
    with pytest.raises(ConfigError, match="method 'ppo' not in"):
        TrainConfig(method="ppo")
    with pytest.raises(ConfigError, match="beta must be > 0"):
        TrainConfig(beta=0)
    with pytest.raises(ConfigError, match="method='dpo' continues a LoRA adapter.*needs finetuning='lora'"):
        TrainConfig(method="dpo", finetuning="full")


def test_cli_train_method_dpo(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from molting.cli import app
    from tests.test_pipeline import make_persona

    persona_dir = tmp_path / "persona"
    persona_dir.mkdir()
    make_persona(persona_dir)
    args = ["train", str(persona_dir), "--out", str(tmp_path / "run"), "--base", str(tiny_llama_dir), "--epochs", "1",
            "--r", "2", "--lora-alpha", "4", "--method", "dpo", "--runs", str(tmp_path / "runs")]
    refused = CliRunner().invoke(app, args, terminal_width=200)
    assert refused.exit_code == 2 and "preferences.jsonl not found" in refused.output
    run_args = ["run", str(persona_dir), "--out", str(tmp_path / "r"), "--base", str(tiny_llama_dir), "--method", "dpo"]
    refused = CliRunner().invoke(app, run_args, terminal_width=200)  # `molting run` passes --method on too
    assert refused.exit_code == 2 and "preferences.jsonl not found" in refused.output
    write(persona_dir, [json.dumps(p, ensure_ascii=False) for p in PAIRS])
    done = CliRunner().invoke(app, args, terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "DPO: 2 steps" in done.output  # 4 pairs / (1 x 4 accumulation) x 2 epochs (TrainConfig's dpo_epochs)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["method"] == "dpo" and [e["step"] for e in saved["dpo"]] == [1, 2]
    continued = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "dpo-only"), "--sft-adapter", str(tmp_path / "run" / "adapter")]
    )
    assert continued.exit_code == 0, continued.output
    assert "DPO: 2 steps" in continued.output
    assert json.loads((tmp_path / "dpo-only" / "run.json").read_text())["loss"] == []
    validated = CliRunner().invoke(app, ["validate", str(persona_dir), "--base", str(tiny_llama_dir)],
                                   terminal_width=200)
    assert "4 preference pairs" in validated.output and "preference pairs (training system prompt)" in validated.output
