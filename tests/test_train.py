import json

import pytest
import torch

import molting.train
from molting.errors import ConfigError
from molting.persona import Persona
from molting.templates import PROBE, template_family, training_template
from molting.train import TrainConfig, train


def tiny_persona(tmp_path, n=6):
    persona = Persona(
        name="Cláudio",
        language="pt",
        identity=["Sou o Cláudio."],
        traits=["curioso"],
        train_system_prompt="Você é o Cláudio.",
        system_prompt="Você é o Cláudio, IA da Softtor.",
        root=tmp_path,
    )
    persona.examples = [
        [{"role": "user", "content": f"Pergunta {i}?"}, {"role": "assistant", "content": "Sou o Cláudio, da Softtor."}]
        for i in range(n)
    ]
    return persona


def test_training_template_marks_exactly_the_assistant_turns(tiny_tokenizer):
    marked = training_template(tiny_tokenizer)
    out = tiny_tokenizer.apply_chat_template(
        PROBE, chat_template=marked, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    learned = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tiny_tokenizer.decode(learned) == "Oi! Tudo bem.<|im_end|>Agora, isto.<|im_end|>"


def test_training_template_refuses_a_template_it_does_not_reproduce(tiny_tokenizer):
    original = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = original.replace("<|im_start|>", "<|im_start|> ")
        with pytest.raises(ConfigError, match="renders differently"):
            training_template(tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = original


def test_template_families():
    assert template_family("{{ '<|im_start|>' }}") == "chatml"
    assert template_family("<|assistant|> <|end|>") == "phi3"
    assert template_family("<|assistant|> </s>") == "zephyr"
    with pytest.raises(ConfigError, match="unknown chat-template family"):
        template_family("[INST]")


def test_a_few_lora_steps_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    persona = tiny_persona(tmp_path)
    steps = []
    config = TrainConfig(
        base_model=str(tiny_llama_dir),
        num_train_epochs=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        finetuning="lora",
    )
    record = train(persona, tmp_path / "run", config, on_step=lambda s, n, logs: steps.append((s, n)))

    assert steps[-1] == (6, 6)
    assert [entry["step"] for entry in record.loss] == [1, 2, 3, 4, 5, 6]
    assert record.loss[-1]["loss"] < record.loss[0]["loss"]
    assert record.device == "cpu" and record.quantization == "none"
    assert record.budget["examples"] == 6 and record.budget["truncated_examples"] == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["r"] == 4 and saved["versions"]["peft"]
    assert not any(p.name.startswith(".adapter.partial") for p in (tmp_path / "run").iterdir())


def test_full_finetuning_trains_every_weight_and_writes_a_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = TrainConfig(
        base_model=str(tiny_llama_dir),
        num_train_epochs=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        finetuning="full",
    )
    record = train(tiny_persona(tmp_path), tmp_path / "run", config)
    assert record.loss[-1]["loss"] < record.loss[0]["loss"]
    model_dir = tmp_path / "run" / "model"
    assert not (tmp_path / "run" / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    changed = [name for name in base if not torch.equal(base[name], trained[name])]
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed  # not only LoRA targets
    vocab = AutoTokenizer.from_pretrained(tiny_llama_dir).get_vocab()
    assert AutoTokenizer.from_pretrained(model_dir).get_vocab() == vocab
    with pytest.raises(ConfigError, match="finetuning='full' trains fp32"):
        TrainConfig(finetuning="full", quantization="4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only refused without CUDA")
def test_auto_trains_every_weight_of_a_small_model_and_lora_otherwise(tiny_llama_dir, monkeypatch):
    """finetuning="auto": full for a model whose 16 bytes per parameter fit FULL_FINETUNING_BYTES
    (and SFT without 4-bit), LoRA otherwise; the learning rate follows unless given."""
    from transformers import AutoModelForCausalLM

    import molting.train
    from molting.modelfiles import parameter_count
    from molting.train import resolve_config

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    n = parameter_count(tiny_llama_dir)
    assert n == sum(p.numel() for p in model.parameters())
    base = TrainConfig(base_model=str(tiny_llama_dir))
    assert (resolve_config(base).finetuning, resolve_config(base).learning_rate) == ("full", 1e-4)
    assert resolve_config(TrainConfig(base_model=str(tiny_llama_dir), learning_rate=3e-4)).learning_rate == 3e-4
    assert resolve_config(TrainConfig(base_model=str(tiny_llama_dir), method="dpo")).finetuning == "lora"
    assert resolve_config(TrainConfig(base_model=str(tiny_llama_dir), quantization="4bit")).finetuning == "lora"
    lora = resolve_config(TrainConfig(base_model=str(tiny_llama_dir), finetuning="lora"))
    assert (lora.finetuning, lora.learning_rate) == ("lora", 1e-3)
    monkeypatch.setattr(molting.train, "FULL_FINETUNING_BYTES", 16 * n - 1)  # one byte short
    assert resolve_config(base).finetuning == "lora"
    monkeypatch.setattr(molting.train, "FULL_FINETUNING_BYTES", 16 * n)
    assert resolve_config(base).finetuning == "full"


def test_qlora_on_the_cpu_trains_a_phi3_shape_merges_and_exports(tiny_phi3_dir, tmp_path):
    """Issue 21: a 4-bit (NF4) base trains on the CPU, with a warning about speed, through molting's
    NF4 loader; the loss (on the assistant's tokens: the training template marks them) falls, and
    the adapter merges into the full-precision base and exports to GGUF."""
    import bitsandbytes as bnb
    import gguf
    from safetensors import safe_open

    from molting.export import merge_adapter, write_gguf

    loaded = []
    original = molting.train._load_model
    molting_loader = lambda *args: loaded.append(original(*args)) or loaded[-1]  # noqa: E731
    config = TrainConfig(
        base_model=str(tiny_phi3_dir), quantization="4bit", num_train_epochs=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, r=4, lora_alpha=8, learning_rate=1e-2, finetuning="lora",
    )
    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match="4-bit .* on the CPU"):
        patch.setattr(molting.train, "_load_model", molting_loader)
        record = train(tiny_persona(tmp_path), tmp_path / "run", config)
    assert record.quantization == "4bit" and record.device == "cpu"
    qkv = loaded[0].model.layers[0].self_attn.qkv_proj.base_layer  # peft wrapped it in place
    assert isinstance(qkv, bnb.nn.Linear4bit) and qkv.weight.quant_state.nested  # NF4 with double quantization
    losses = [entry["loss"] for entry in record.loss]
    assert len(losses) == 9 and losses[-1] < 0.7 * losses[0]
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert {key.split(".")[-3] for key in f.keys()} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # noqa: SIM118
    merged = merge_adapter(tiny_phi3_dir, tmp_path / "run" / "adapter", tmp_path / "merged")
    out = write_gguf(merged, tmp_path / "phi3.gguf", outtype="f16")
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "phi3"
    assert any(t.name == "blk.0.attn_qkv.weight" for t in reader.tensors)


def test_bad_config_values_are_named():
    with pytest.raises(ConfigError, match="quantization 'int3'"):
        TrainConfig(quantization="int3")
    with pytest.raises(ConfigError, match="r must be >= 1"):
        TrainConfig(r=0)


@pytest.mark.parametrize("enabled", [False, True])
def test_checkpointing_switch_is_honoured_without_deprecation_warnings(enabled, tmp_path):
    import warnings

    from trl import SFTConfig

    from molting.train import _checkpointing

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **_checkpointing(enabled))
    assert args.gradient_checkpointing is enabled


SENTENCEPIECE_MODELS = [("tiny_tinyllama_dir", "zephyr", "</s>"), ("tiny_phi3_dir", "phi3", "<|end|>")]


@pytest.mark.parametrize(("model", "family", "end"), SENTENCEPIECE_MODELS)
def test_training_template_of_tinyllama_and_phi3(request, model, family, end):
    """TinyLlama's Zephyr and Phi-3's own templates get molting's marked ones, which render
    them token for token and mark the answers with the token that ends them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    assert template_family(tokenizer.chat_template) == family
    out = tokenizer.apply_chat_template(
        PROBE, chat_template=training_template(tokenizer), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    learned = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert learned.count(end_id) == 2 and learned[-1] == end_id  # each answer ends with the end token
    first = learned.index(end_id)
    answers = [tokenizer.decode(learned[:first]), tokenizer.decode(learned[first + 1 : -1])]
    assert [a.strip() for a in answers] == ["Oi! Tudo bem.", "Agora, isto."]


@pytest.mark.parametrize("model", ["tiny_tinyllama_dir", "tiny_phi3_dir"])
def test_a_few_lora_steps_on_tinyllama_and_phi3_shapes(request, tmp_path, model):
    from safetensors import safe_open

    config = TrainConfig(
        base_model=str(request.getfixturevalue(model)), num_train_epochs=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, r=4, lora_alpha=8, learning_rate=1e-2, finetuning="lora",
    )
    record = train(tiny_persona(tmp_path), tmp_path / "run", config)
    assert [entry["step"] for entry in record.loss] == [1, 2, 3, 4, 5, 6]
    assert record.loss[-1]["loss"] < record.loss[0]["loss"]
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        adapted = {key.split(".")[-3] for key in f.keys()}  # noqa: SIM118
    fused = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # Phi-3's four linear layers per block
    assert adapted == (fused if "phi3" in model else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"})


def test_a_windows_copy_of_the_example_dataset_trains(tiny_llama_dir, tmp_path):
    """Issue 12: a dataset saved with a UTF-8 byte-order mark and CRLF line ends loads and trains."""
    import shutil

    persona_dir = tmp_path / "claudio"
    shutil.copytree("examples/claudio", persona_dir)
    lines = (persona_dir / "dataset.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (persona_dir / "dataset.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    persona = Persona.load(persona_dir)
    assert persona.examples[0][0]["content"] == json.loads(lines[0])["messages"][0]["content"]
    config = TrainConfig(
        base_model=str(tiny_llama_dir), num_train_epochs=1, gradient_accumulation_steps=4, r=2, finetuning="lora"
    )
    record = train(persona, tmp_path / "run", config)
    assert [entry["step"] for entry in record.loss] == [1] and record.budget["examples"] == 4
