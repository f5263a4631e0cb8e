"""Load a causal LM with its linear layers in 4-bit NF4, one tensor at a time.

Why: transformers' ``from_pretrained`` with a bitsandbytes config may put
full-precision weights on the GPU faster than it quantizes them (transformers issue
#43032: asynchronous loading in worker threads). PR #44576 made loading synchronous when
quantizing on the fly, and ``HF_DEACTIVATE_ASYNC_LOAD=1`` is the documented switch;
versions of transformers 5 before that PR lack the first. This loader holds at most one
full-precision tensor beside the 4-bit model whatever the version:

1. build the model from its config with empty weights (``accelerate.init_empty_weights``;
   buffers such as RoPE's ``inv_freq`` are computed for real);
2. replace every ``nn.Linear`` except the output embedding with ``bnb.nn.Linear4bit``,
   as transformers' bitsandbytes integration does;
3. read the safetensors files one tensor at a time (``safetensors.safe_open``): a
   linear weight is cast to the compute dtype, moved to the device and quantized
   there (``bnb.nn.Params4bit.to``), anything else is placed in the compute dtype;
4. tie the output embedding to the input one where the config says so.

Peak device memory is then the 4-bit model plus the largest single tensor in the
compute dtype and its quantization buffers. NF4: Dettmers et al., 2023, QLoRA
(https://arxiv.org/abs/2305.14314).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from molting.errors import ConfigError
from molting.modelfiles import check_model_dir

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class NF4Config:
    """How the linear layers are quantized (the fields of transformers' BitsAndBytesConfig).

    Attributes:
        compute_dtype: dtype of the matmuls and of every weight that stays unquantized.
        double_quant: quantize the per-block scales too (``bnb_4bit_use_double_quant``).
        blocksize: weights per quantization block (bitsandbytes' default 64).
    """

    compute_dtype: torch.dtype = torch.bfloat16
    double_quant: bool = True
    blocksize: int = 64


def load_nf4(model_dir: str | Path, device: str | torch.device, config: NF4Config = NF4Config()) -> nn.Module:
    """Load the transformers model in ``model_dir`` with NF4 linear layers on ``device``.

    Args:
        model_dir: a model directory with config.json and safetensors weights (one file
            or shards named by ``model.safetensors.index.json``).
        device: "cuda", "cuda:1" or "cpu" (bitsandbytes 0.50 quantizes and runs NF4 on CPU).
        config: the quantization settings.

    Returns:
        The model in eval mode, ``is_loaded_in_4bit`` set (peft wraps its Linear4bit layers
        by that flag).

    Raises:
        ModelFileError: no config.json, no weights, or a truncated safetensors file.
        ConfigError: weights whose names the model does not have, or parameters the
            checkpoint lacks (an architecture whose checkpoint names need transformers'
            own conversion: use ``TransformersBackend(..., loader="transformers")``).
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    model = _empty_model(model_dir, config.compute_dtype)
    skip = _output_embedding_names(model)
    _replace_linear(model, config, skip)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for name, tensor in _tensors(model_dir):
        _place(model, _target_name(model, names, name, model_dir), tensor, device, config)
    model.tie_weights()
    _check_complete(model, model_dir)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    model.is_loaded_in_4bit = True
    return model.eval()


def _empty_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Modules kept in the compute dtype: the output embedding (lm_head), as transformers keeps it."""
    output = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is output}


def _replace_linear(model: nn.Module, config: NF4Config, skip: set[str]) -> None:
    """Swap each ``nn.Linear`` (not in ``skip``) for an empty ``bnb.nn.Linear4bit`` of the same shape."""
    import bitsandbytes as bnb

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.double_quant,
            quant_type="nf4",
            device="meta",
        )
        quantized.requires_grad_(False)
        setattr(model.get_submodule(parent_name), child, quantized)


def _tensors(model_dir: Path):
    """Yield ``(name, tensor)`` from the safetensors files, one tensor in memory at a time (on CPU)."""
    from safetensors import safe_open

    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise ConfigError(f"{model_dir}: the NF4 loader reads safetensors only; use loader='transformers'")
    for file in files:
        with safe_open(model_dir / file, framework="pt", device="cpu") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                yield name, weights.get_tensor(name)


def _target_name(model: nn.Module, names: set[str], name: str, model_dir: Path) -> str:
    """The model's name (one of ``names``) for checkpoint tensor ``name``; a base-model checkpoint lacks the prefix."""
    for candidate in (name, f"{model.base_model_prefix}.{name}"):
        if candidate in names:
            return candidate
    raise ConfigError(
        f"{model_dir}: the checkpoint's tensor {name!r} is not a parameter of {type(model).__name__}; "
        "load this model with loader='transformers'"
    )


def _place(model: nn.Module, name: str, tensor: torch.Tensor, device, config: NF4Config) -> None:
    """Put ``tensor`` at ``name`` on ``device``: quantized if it is a Linear4bit's weight."""
    import bitsandbytes as bnb

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if tensor.is_floating_point():
        tensor = tensor.to(config.compute_dtype)
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        module._parameters["weight"] = bnb.nn.Params4bit(
            tensor,
            requires_grad=False,
            blocksize=config.blocksize,
            compress_statistics=config.double_quant,
            quant_type="nf4",
            module=module,
        ).to(device)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor.to(device), requires_grad=False)
    else:
        module._buffers[attr] = tensor.to(device)


def _check_complete(model: nn.Module, model_dir: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ConfigError(
            f"{model_dir}: the checkpoint lacks {len(missing)} parameter(s) of {type(model).__name__} "
            f"({', '.join(missing[:3])}, ...); load this model with loader='transformers'"
        )
