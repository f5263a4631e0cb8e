"""One LoRA/QLoRA recipe, read top to bottom.

LoRA (Hu et al., 2021, arXiv:2106.09685) through peft; QLoRA (Dettmers et al.,
2023, arXiv:2305.14314: NF4 base, double quantization, bf16 compute) through
bitsandbytes when CUDA is present; supervised fine-tuning through TRL's
``SFTTrainer`` with the loss on assistant tokens only. The training system prompt
is prepended to every example; the inference prompt is used at inference.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from molting.data import BudgetReport, token_budget, with_system_prompt
from molting.errors import ConfigError
from molting.io import atomic_path
from molting.models import SOURCE_FILE, resolve_base_model
from molting.persona import Persona
from molting.registry import package_versions
from molting.templates import training_template

# Every linear layer of a decoder block: Llama's (SmolLM2, TinyLlama, Qwen2) and Phi-3's fused
# qkv_proj and gate_up_proj. peft adapts the names a model has and skips the others.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]
Quantization = Literal["auto", "4bit", "none"]


@dataclass
class TrainConfig:
    """Hyperparameters of a run. Defaults suit ~100 short examples on a 135M-1B model.

    Attributes:
        base_model: embedded name (``smollm2-135m``) or a local model directory.
        r, lora_alpha, lora_dropout, target_modules: the LoRA adapter (scale = lora_alpha / r).
        num_train_epochs, learning_rate, per_device_train_batch_size,
        gradient_accumulation_steps, warmup_ratio: the optimizer schedule (AdamW, linear decay).
            The default batch of 4 is 1 sequence x 4 accumulation steps: on SmolLM2-135M (CPU,
            8 steps) that gave the same losses at the same speed as 4 x 1, with a peak RSS of
            2.2 GB instead of 5.4 GB: about 1 GB per sequence in the micro-batch.
        max_length: tokens per training sequence; longer examples are truncated and reported.
        quantization: "auto" (4-bit NF4 on CUDA, none on CPU), "4bit" or "none".
        seed: for the adapter's init and the data order.
        finetuning: "lora" (an adapter; the LoRA fields apply) or "full" (every weight trained,
            fp32, no quantization; the run writes ``model/`` instead of ``adapter/``). Full
            fine-tuning wants a learning rate ~10x below LoRA's (1e-4 rather than 1e-3).
    """

    base_model: str = "smollm2-135m"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    num_train_epochs: float = 2.0
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    warmup_ratio: float = 0.05
    max_length: int = 512
    quantization: Quantization = "auto"
    seed: int = 0
    finetuning: Literal["lora", "full"] = "lora"

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "4bit", "none"):
            raise ConfigError(f"quantization {self.quantization!r} not in ('auto', '4bit', 'none')")
        if self.finetuning not in ("lora", "full"):
            raise ConfigError(f"finetuning {self.finetuning!r} not in ('lora', 'full')")
        if self.finetuning == "full" and self.quantization == "4bit":
            raise ConfigError("finetuning='full' trains fp32 weights; 4-bit (QLoRA) needs finetuning='lora'")
        for name in ("r", "lora_alpha", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RunRecord:
    """What a training run did, written as ``run.json`` next to the adapter."""

    config: dict
    device: str
    quantization: str
    budget: dict
    loss: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = "rss"
    versions: dict = field(default_factory=dict)


def train(
    persona: Persona,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> RunRecord:
    """Fine-tune ``config.base_model`` on ``persona.examples`` with LoRA.

    Args:
        persona: a loaded persona with examples.
        output_dir: receives ``adapter/`` (a peft adapter directory) and ``run.json``.
        config: hyperparameters; TrainConfig() if None.
        on_step: called as on_step(step, total_steps, logs) after each optimizer step.

    Returns:
        The run record (also written to ``output_dir/run.json``).

    Raises:
        ConfigError: no examples, 4-bit asked without CUDA, an unsupported chat template.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    config = config or TrainConfig()
    if not persona.examples:
        raise ConfigError(f"persona {persona.name!r} has no examples ({persona.root}/dataset.jsonl)")
    model_dir = resolve_base_model(config.base_model)
    tokenizer = _training_tokenizer(model_dir)
    budget = token_budget(tokenizer, persona.examples, persona.train_system_prompt, config.max_length)
    device, quantization = _placement("none" if config.finetuning == "full" else config.quantization)
    model = _load_model(model_dir, quantization)

    scratch = tempfile.mkdtemp(prefix="molting-trainer-")  # the trainer's own files; not kept
    rows = [{"messages": with_system_prompt(c, persona.train_system_prompt)} for c in persona.examples]
    args = SFTConfig(
        output_dir=scratch,
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        max_length=config.max_length,
        assistant_only_loss=True,
        **_checkpointing(quantization == "4bit"),
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    record = RunRecord(asdict(config), device, quantization, budget.summary(), versions=package_versions())
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora if config.finetuning == "lora" else None,
        callbacks=[_LossRecorder(record, on_step)],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through on_step instead
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record.train_seconds = round(time.perf_counter() - start, 2)
    record.peak_memory_mb, record.peak_memory_kind = _peak_memory(device)
    _save(trainer, record, Path(output_dir), model_dir if config.finetuning == "full" else None)
    return record


def training_budget(persona: Persona, config: TrainConfig | None = None) -> BudgetReport:
    """The token budget ``train`` will face: the persona's examples with its training system
    prompt, rendered by the base model's tokenizer and training chat template.

    Raises:
        ConfigError: the persona has no examples.
    """
    config = config or TrainConfig()
    if not persona.examples:
        raise ConfigError(f"persona {persona.name!r} has no examples ({persona.root}/dataset.jsonl)")
    tokenizer = _training_tokenizer(resolve_base_model(config.base_model))
    return token_budget(tokenizer, persona.examples, persona.train_system_prompt, config.max_length)


def _training_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = training_template(tokenizer)
    return tokenizer


def _checkpointing(enabled: bool) -> dict[str, bool]:
    """Activation checkpointing on or off, by the name this transformers version takes.

    transformers 5.24 renamed ``gradient_checkpointing`` to ``activation_checkpointing``
    and warns on the old name; TRL's SFTConfig defaults it to on.
    """
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled}


def _placement(quantization: Quantization) -> tuple[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantization == "auto":
        quantization = "4bit" if device == "cuda" else "none"
    if quantization == "4bit" and device != "cuda":
        raise ConfigError("quantization='4bit' (QLoRA) needs CUDA; on CPU use quantization='none' (plain LoRA)")
    return device, quantization


def _load_model(model_dir: Path, quantization: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from peft import prepare_model_for_kbit_training

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=nf4, dtype=torch.bfloat16, device_map={"": 0}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def _peak_memory(device: str) -> tuple[float, str]:
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "vram"
    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "rss"


def _save(trainer, record: RunRecord, output_dir: Path, base_dir: Path | None = None) -> None:
    """``adapter/`` (LoRA) or, given the ``base_dir`` of a full fine-tune, ``model/``: the weights
    with the base's tokenizer files, as ``merge_adapter`` writes a merged model."""
    if base_dir is None:
        with atomic_path(output_dir / "adapter", directory=True) as tmp:
            trainer.model.save_pretrained(tmp)
    else:
        from transformers import AutoTokenizer

        with atomic_path(output_dir / "model", directory=True) as tmp:
            trainer.model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
            for name in (SOURCE_FILE, "tokenizer.model"):
                if (base_dir / name).is_file():
                    shutil.copy2(base_dir / name, tmp / name)
    with atomic_path(output_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=2, ensure_ascii=False))


class _LossRecorder(TrainerCallback):
    """Appends each logged loss to the record and reports progress."""

    def __init__(self, record: RunRecord, on_step: Callable[[int, int, dict], None] | None):
        self.record, self.on_step = record, on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 3)}
            entry.update({k: logs[k] for k in ("loss", "learning_rate", "grad_norm") if k in logs})
            self.record.loss.append(entry)
            if self.on_step:
                self.on_step(state.global_step, state.max_steps, logs)
