"""The training memory planner (molting.fit_train) against what torch, bitsandbytes and peft hold.

Each term is recounted here from the real objects on a small random model: autograd's saved
tensors (one per storage) for the activations, ``Params4bit`` and its quantization state for
the NF4 weights, peft's trainable parameters for the adapter. Peak memory of whole runs against
the planner: ``benchmarks/train_memory.py``.
"""

import subprocess
import sys

import pytest
import torch

from molting.errors import ConfigError
from molting.fit import GIB, MIB, load_shape, shape_from_config
from molting.fit_train import (
    TrainSetup,
    estimate_training,
    layer_activation_bytes,
    lora_parameters,
    nf4_bytes,
    plan_training,
    usable,
    weight_bytes,
)
from molting.train import LORA_TARGETS

TOKENS = 64


def _config(arch: str) -> dict:
    """A Llama (GQA) or Phi-3 config wide enough that NF4 blocks and LoRA ranks are realistic."""
    config = dict(
        vocab_size=1024, hidden_size=256, intermediate_size=640, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2 if arch == "llama" else 8, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    config["architectures"] = ["LlamaForCausalLM" if arch == "llama" else "Phi3ForCausalLM"]
    return config


def _model(arch: str, finetuning: str, tmp_path):
    """The model as molting.train holds it for ``finetuning`` (LoRA r=16, dropout 0.05, on every linear)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _config(arch)
    hf_config = AutoConfig.for_model("llama" if arch == "llama" else "phi3", **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config)
    if finetuning == "qlora":
        from molting.backends.nf4 import load_nf4

        model.save_pretrained(tmp_path)
        model = prepare_model_for_kbit_training(load_nf4(tmp_path, "cpu"), use_gradient_checkpointing=False)
    if finetuning != "full":
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if finetuning == "qlora":  # as TRL's SFTTrainer does for a 4-bit base
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    return model.train(), shape_from_config(config, arch)


def _saved_bytes_of_layer(model, layer: int) -> int:
    """Bytes of the distinct storages autograd saves inside decoder layer ``layer``, parameters excluded."""
    layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
    seen, inside = {}, [False]
    layers[layer].register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layers[layer].register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(t):
        if inside[0]:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 1024, (1, TOKENS)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("finetuning", ["full", "lora", "qlora"])
def test_layer_activations_are_what_autograd_saves(arch, finetuning, tmp_path):
    model, shape = _model(arch, finetuning, tmp_path)
    measured = _saved_bytes_of_layer(model, 1)
    planned = TOKENS * layer_activation_bytes(shape, TrainSetup(finetuning, r=16, device="cpu"))
    assert planned == pytest.approx(measured, rel=0.03)
    without_dropout = TOKENS * layer_activation_bytes(shape, TrainSetup(finetuning, device="cpu", lora_dropout=0))
    if finetuning != "full":  # negative control: the dropout copies are a real part of the count
        assert without_dropout < 0.8 * measured


def test_nf4_bytes_are_what_bitsandbytes_stores():
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(640, 256, dtype=torch.bfloat16)
    param = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4")
    param = param.to("cpu")
    state = param.quant_state
    stored = param.numel() * param.element_size() + state.absmax.numel() + 4 * state.state2.absmax.numel()
    assert nf4_bytes(weight.numel()) == stored
    assert nf4_bytes(weight.numel(), double_quant=False) > stored  # fp32 absmax per block costs more


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_weights_and_adapter_are_what_the_models_hold(arch, tmp_path):
    model, shape = _model(arch, "qlora", tmp_path)
    held = 0
    for p in model.parameters():
        held += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            held += sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.state2.absmax,
                                                                 state.state2.code))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights, quant_state = weight_bytes(shape, "qlora")
    assert lora_parameters(shape, 16) == trainable
    assert weights + quant_state + 2 * trainable == pytest.approx(held, rel=0.001)
    full, _ = weight_bytes(shape, "full")
    assert full == 4 * sum(p.numel() for p in _model(arch, "full", tmp_path / "f")[0].parameters())


def test_phi3_mini_qlora_in_4gib_and_the_plan_that_fits():
    shape = load_shape("phi-3-mini")
    result = plan_training(shape, TrainSetup("qlora", max_length=512), 4 * GIB)
    assert result.best is not None and result.best.total <= usable(4 * GIB)
    assert result.best.setup.finetuning == "qlora" and result.best.setup.ckpt
    lora = estimate_training(shape, TrainSetup("lora", max_length=512))
    assert lora.weights == 4 * sum(t.n_elements for t in shape.tensors) > 14 * GIB  # fp32 base: no chance
    longer = estimate_training(shape, TrainSetup("qlora", max_length=1024))
    assert longer.total > result.asked.total  # activations and the loss grow with the tokens
    assert plan_training(shape, TrainSetup("qlora"), 2 * GIB).best is None  # the NF4 weights alone are 2.4 GiB


def test_checkpointing_keeps_one_layer_instead_of_all():
    shape = load_shape("tinyllama-1.1b")
    on = estimate_training(shape, TrainSetup("lora", max_length=1024, checkpointing=True))
    off = estimate_training(shape, TrainSetup("lora", max_length=1024, checkpointing=False))
    assert off.activations > 8 * on.activations
    with pytest.raises(ConfigError, match="finetuning 'int4' not in"):
        TrainSetup("int4")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molting.cli", *args], capture_output=True, text=True, timeout=300)


def test_fit_train_cli_prints_the_table_and_the_plan():
    result = _cli("fit", "phi-3-mini", "--train", "--finetuning", "qlora", "--max-length", "512", "--vram", "4GiB")
    assert result.returncode == 0, result.stderr
    assert "best plan that fits: qlora r=16" in result.stdout.replace("\n", " ")
    assert "NF4 quantization state" in result.stdout
    bad = _cli("fit", "phi-3-mini", "--train", "--finetuning", "int4")
    assert bad.returncode == 2 and "finetuning 'int4' not in" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "gpu")], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU on this machine; nothing measured (run it on a machine with one)"
    ]
    assert not list(tmp_path.iterdir())
    assert MIB == 2**20


def test_train_stops_with_one_line_when_the_estimate_exceeds_the_device(tiny_llama_dir, tmp_path, monkeypatch):
    """`molting train` prints its estimate; over the device's memory it names a plan that fits and
    writes nothing; --force passes the check (the run itself is stopped right after it here)."""
    import shutil

    from typer.testing import CliRunner

    import molting.pipeline
    import molting.train
    from molting.cli import app
    from molting.train import TrainConfig, memory_plan

    monkeypatch.setattr(molting.train, "_device_memory", lambda device: 6 * MIB)
    shutil.copytree("examples/claudio", tmp_path / "claudio")
    args = ["train", str(tmp_path / "claudio"), "--base", str(tiny_llama_dir), "--finetuning", "lora",
            "--no-checkpointing", "--out", str(tmp_path / "run"), "--runs", str(tmp_path / "runs")]
    plan = memory_plan(TrainConfig(base_model=str(tiny_llama_dir), finetuning="lora", checkpointing=False))
    assert not plan.fits(plan.asked) and plan.best is not None  # the premise: 6 MiB is too little, a plan fits
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "memory estimate:" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "would fit: qlora r=16" in errors[0] and "--force" in errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()

    def stop(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(molting.pipeline, "train", stop)  # train_persona's own name for molting.train.train
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 7  # past the check, into training
