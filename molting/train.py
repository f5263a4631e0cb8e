"""One LoRA/QLoRA recipe, read top to bottom.

LoRA (Hu et al., 2021, arXiv:2106.09685) through peft; QLoRA (Dettmers et al.,
2023, arXiv:2305.14314: NF4 base, double quantization, bf16 compute) through
bitsandbytes when CUDA is present; supervised fine-tuning through TRL's
``SFTTrainer`` with the loss on assistant tokens only. The training system prompt
is prepended to every example; the inference prompt is used at inference.

``method="dpo"`` continues the same adapter with Direct Preference Optimization
(Rafailov et al., 2023, arXiv:2305.18290) through TRL's ``DPOTrainer`` on the persona's
``preferences.jsonl``, against the SFT model as the reference (see :func:`_dpo`).
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
from molting.errors import ConfigError, MoltingError
from molting.io import atomic_path
from molting.modelfiles import check_adapter_dir, parameter_count, read_adapter_config
from molting.models import SOURCE_FILE, resolve_base_model
from molting.persona import DATASET_FILE, PREFERENCES_FILE, Persona
from molting.preferences import preference_budget
from molting.registry import package_versions
from molting.templates import training_template

# Every linear layer of a decoder block: Llama's (SmolLM2, TinyLlama, Qwen2) and Phi-3's fused
# qkv_proj and gate_up_proj. peft adapts the names a model has and skips the others.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]
Quantization = Literal["auto", "4bit", "none"]
Method = Literal["sft", "dpo"]
Finetuning = Literal["auto", "lora", "full"]
# finetuning="auto" trains every weight when the fp32 weights, their gradients and AdamW's two
# moments (16 bytes per parameter) take at most this much memory: SmolLM2-135M (2.0 GiB) yes,
# SmolLM2-360M (5.4 GiB), TinyLlama-1.1B and Phi-3-mini no. On SmolLM2-135M full fine-tuning made
# the better Cláudio: rubric 6.1 against 4.1/10, 27 against 16 of 35 held-out probes, at the
# same 2 epochs (experiments/RECIPES.md, rows extra-full and extra-rp1.1).
FULL_FINETUNING_BYTES = 4 * 2**30
BYTES_PER_TRAINED_PARAMETER = 16
# The learning rate when none is given: LoRA's adapter wants ~10x full fine-tuning's.
LEARNING_RATES = {"lora": 1e-3, "full": 1e-4}
# The frozen copy of the SFT adapter that TRL's DPOTrainer makes for the reference (see _dpo).
REFERENCE_ADAPTER = "ref"


@dataclass
class TrainConfig:
    """Hyperparameters of a run. Defaults suit ~100 short examples on a 135M-1B model.

    Attributes:
        base_model: embedded name (``smollm2-135m``) or a local model directory.
        r, lora_alpha, lora_dropout, target_modules: the LoRA adapter (scale = lora_alpha / r).
        num_train_epochs, learning_rate, per_device_train_batch_size,
        gradient_accumulation_steps, warmup_ratio: the optimizer schedule (AdamW, linear decay).
            ``learning_rate`` None: 1e-3 for LoRA, 1e-4 for full fine-tuning (LEARNING_RATES).
            The default batch of 4 is 1 sequence x 4 accumulation steps: on SmolLM2-135M (CPU,
            8 steps) that gave the same losses at the same speed as 4 x 1, with a peak RSS of
            2.2 GB instead of 5.4 GB: about 1 GB per sequence in the micro-batch.
        max_length: tokens per training sequence; longer examples are truncated and reported.
        quantization: "auto" (4-bit NF4 on CUDA, none on CPU), "4bit" or "none".
        seed: for the adapter's init and the data order.
        method: "sft" (supervised fine-tuning on the dataset) or "dpo" (that, then DPO on the
            persona's ``preferences.jsonl``, continuing the same adapter).
        beta: DPO's KL strength (how far the policy may move from the SFT reference; TRL's default 0.1).
        dpo_epochs, dpo_learning_rate: DPO's schedule; batch, accumulation, warmup and
            ``max_length`` are the SFT ones. 1e-4 is ten times below the SFT rate: a starting
            point, not a tuned value.
        sft_adapter: with ``method="dpo"``: a LoRA adapter directory already trained by SFT on this
            persona and base (a previous run's ``adapter/``). The SFT phase is skipped and DPO
            continues that adapter, with it as the reference; its own ``r``, ``lora_alpha`` and
            target modules apply. For iterating on ``preferences.jsonl`` without retraining SFT.
        finetuning: "lora" (an adapter; the LoRA fields apply), "full" (every weight trained,
            fp32, no quantization; the run writes ``model/`` instead of ``adapter/``; SFT only),
            or "auto": "full" for a model whose full fine-tuning state fits in
            ``FULL_FINETUNING_BYTES`` (SFT, no 4-bit asked), else "lora". ``resolve_config``
            decides it before training; ``train`` records the decided value.
    """

    base_model: str = "smollm2-135m"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    num_train_epochs: float = 2.0
    learning_rate: float | None = None
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    warmup_ratio: float = 0.05
    max_length: int = 512
    quantization: Quantization = "auto"
    seed: int = 0
    method: Method = "sft"
    beta: float = 0.1
    dpo_epochs: float = 2.0
    dpo_learning_rate: float = 1e-4
    finetuning: Finetuning = "auto"
    sft_adapter: str | None = None

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "4bit", "none"):
            raise ConfigError(f"quantization {self.quantization!r} not in ('auto', '4bit', 'none')")
        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"method {self.method!r} not in ('sft', 'dpo')")
        for name in ("beta", "dpo_epochs", "dpo_learning_rate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.finetuning not in ("auto", "lora", "full"):
            raise ConfigError(f"finetuning {self.finetuning!r} not in ('auto', 'lora', 'full')")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.finetuning == "full" and self.quantization == "4bit":
            raise ConfigError("finetuning='full' trains fp32 weights; 4-bit (QLoRA) needs finetuning='lora'")
        if self.finetuning == "full" and self.method == "dpo":
            raise ConfigError("method='dpo' continues a LoRA adapter; it needs finetuning='lora'")
        if self.sft_adapter is not None and (self.method != "dpo" or self.finetuning == "full"):
            raise ConfigError("sft_adapter is the LoRA adapter DPO continues: it needs method='dpo', not full")
        for name in ("r", "lora_alpha", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """``config`` with ``finetuning`` and ``learning_rate`` decided (see TrainConfig).

    Raises:
        ModelFileError: "auto" and the base model has no safetensors weights to count.
    """
    finetuning = config.finetuning
    if finetuning == "auto":
        lora_only = config.method == "dpo" or config.quantization == "4bit"
        finetuning = "lora" if lora_only or _full_state_bytes(config.base_model) > FULL_FINETUNING_BYTES else "full"
    learning_rate = config.learning_rate or LEARNING_RATES[finetuning]
    return dataclasses.replace(config, finetuning=finetuning, learning_rate=learning_rate)


def _full_state_bytes(base_model: str) -> int:
    """Bytes that training every weight of ``base_model`` holds (BYTES_PER_TRAINED_PARAMETER per weight)."""
    return parameter_count(resolve_base_model(base_model)) * BYTES_PER_TRAINED_PARAMETER


@dataclass
class RunRecord:
    """What a training run did, written as ``run.json`` next to the adapter.

    ``loss`` is the SFT loss per step; ``dpo`` (``method="dpo"`` only) has per DPO step the loss,
    ``rewards/margins``, ``rewards/accuracies``, ``rewards/chosen``, ``rewards/rejected``
    (TRL's names; rewards are beta x log-ratios to the reference, in nats), learning rate and
    grad norm. ``train_seconds`` covers both phases, ``dpo_seconds`` the DPO phase alone.
    ``pair_budget`` is the pairs' token budget (``BudgetReport.summary``, one "example" per pair).
    """

    config: dict
    device: str
    quantization: str
    budget: dict
    loss: list[dict] = field(default_factory=list)
    dpo: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    dpo_seconds: float = 0.0
    pair_budget: dict = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = "rss"
    versions: dict = field(default_factory=dict)


def train(
    persona: Persona,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> RunRecord:
    """Fine-tune ``config.base_model`` on ``persona.examples`` with LoRA or every weight
    (``config.finetuning``); with ``method="dpo"``, then on ``persona.preferences`` with DPO, in
    the same adapter.

    Args:
        persona: a loaded persona with examples (and preferences for DPO).
        output_dir: receives ``adapter/`` (one peft adapter directory, whatever the method) or,
            with full fine-tuning, ``model/``; and ``run.json``.
        config: hyperparameters; TrainConfig() if None.
        on_step: called as on_step(step, total_steps, logs) after each optimizer step, for
            the SFT steps and then, counting from 1 again, the DPO steps.

    Returns:
        The run record (also written to ``output_dir/run.json``).

    Raises:
        ConfigError: no examples, ``method="dpo"`` without ``preferences.jsonl``, 4-bit asked
            without CUDA, an unsupported chat template.
    """
    config = resolve_config(config or TrainConfig())
    _check_data(persona, config)
    model_dir = resolve_base_model(config.base_model)
    tokenizer = _training_tokenizer(model_dir)
    budget = token_budget(tokenizer, persona.examples, persona.train_system_prompt, config.max_length)
    device, quantization = _placement("none" if config.finetuning == "full" else config.quantization)
    model = _load_model(model_dir, quantization)
    record = RunRecord(asdict(config), device, quantization, budget.summary(), versions=package_versions())
    if config.method == "dpo":
        pairs = preference_budget(tokenizer, persona.preferences, persona.train_system_prompt, config.max_length)
        record.pair_budget = pairs.summary()
    scratch = tempfile.mkdtemp(prefix="molting-trainer-")  # the trainers' own files; not kept
    common = _common_args(config, device, quantization, scratch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        if config.sft_adapter is None:
            model = _sft(model, tokenizer, persona, config, common, _LossRecorder(record.loss, on_step))
        else:
            model = _continue(model, Path(config.sft_adapter), model_dir)
        if config.method == "dpo":
            dpo_start = time.perf_counter()
            _dpo(model, tokenizer, persona, config, common, _LossRecorder(record.dpo, on_step))
            record.dpo_seconds = round(time.perf_counter() - dpo_start, 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record.train_seconds = round(time.perf_counter() - start, 2)
    record.peak_memory_mb, record.peak_memory_kind = _peak_memory(device)
    _save(model, record, Path(output_dir), model_dir if config.finetuning == "full" else None)
    return record


def _check_data(persona: Persona, config: TrainConfig) -> None:
    root = persona.root or Path(".")
    if not persona.examples:
        raise ConfigError(f"persona {persona.name!r} has no examples ({root / DATASET_FILE})")
    if config.method == "dpo" and not persona.preferences:
        raise ConfigError(
            f"method 'dpo' needs preference pairs: {root / PREFERENCES_FILE} not found "
            "(see docs/training.md, 'Preference training'); or train with method 'sft'"
        )


def _common_args(config: TrainConfig, device: str, quantization: str, scratch: str) -> dict:
    """The trainer arguments SFT and DPO share."""
    return dict(
        output_dir=scratch,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        max_length=config.max_length,
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


def _sft(model, tokenizer, persona: Persona, config: TrainConfig, common: dict, recorder: TrainerCallback):
    """Supervised fine-tuning of a new LoRA adapter on the dataset; returns the peft model."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": with_system_prompt(c, persona.train_system_prompt)} for c in persona.examples]
    args = SFTConfig(
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        assistant_only_loss=True,
        **common,
    )
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora if config.finetuning == "lora" else None,
        callbacks=[recorder],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through on_step instead
    trainer.train()
    return trainer.model


def _continue(model, adapter: Path, model_dir: Path):
    """``model`` with the trained SFT ``adapter`` on it, trainable, as adapter "default".

    Raises:
        ModelFileError: the adapter directory has no config or weights.
        ConfigError: the adapter was trained on another base model.
    """
    from peft import PeftModel

    check_adapter_dir(adapter)
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    try:
        same = base is not None and resolve_base_model(base).resolve() == model_dir.resolve()
    except MoltingError:
        same = False
    if not same:
        raise ConfigError(f"{adapter / 'adapter_config.json'}: trained on {base!r}, not on {model_dir}")
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def _dpo(model, tokenizer, persona: Persona, config: TrainConfig, common: dict, recorder: TrainerCallback) -> None:
    """DPO on the preference pairs, continuing the SFT adapter of ``model`` in place.

    The reference is the SFT model: base + SFT adapter, frozen. TRL 1.16's ``DPOTrainer``,
    given a ``PeftModel`` that already carries an adapter and no ``ref_model``, copies the
    adapter ("default") into a second, frozen adapter named "ref" and computes the reference
    log-probabilities with "ref" active; the policy trains "default". (Given a fresh
    ``peft_config`` instead it would disable the adapter for the reference, i.e. compare with
    the bare base, which after SFT is the wrong model: the first DPO loss would not be log 2.)
    This costs one LoRA copy of memory and one forward pass without gradients per step, and
    keeps the reference exact, where a merged copy of the model would double the weights.
    (``precompute_ref_log_probs`` would do that reference pass once before training, with the
    same "ref" adapter, saving about a quarter of each step; not used: it writes through the
    datasets cache, and the pairs are few.) The copy is checked to exist, then removed before
    saving: one adapter results. TRL turns dropout off for DPO (``disable_dropout``), so
    policy and reference agree exactly at the first step.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [pair.row(persona.train_system_prompt) for pair in persona.preferences]
    args = DPOConfig(
        num_train_epochs=config.dpo_epochs,
        learning_rate=config.dpo_learning_rate,
        beta=config.beta,
        **common,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    if REFERENCE_ADAPTER not in model.peft_config:
        raise ConfigError(
            "this TRL/peft pair did not make a frozen copy of the SFT adapter; DPO would take the "
            "bare base as its reference. Use TRL 1.16 with peft >= 0.20"
        )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.delete_adapter(REFERENCE_ADAPTER)


def training_budget(persona: Persona, config: TrainConfig | None = None) -> BudgetReport:
    """The token budget ``train`` will face: the persona's examples with its training system
    prompt, rendered by the base model's tokenizer and training chat template.

    Raises:
        ConfigError: the persona has no examples, or ``method="dpo"`` and no preferences.
    """
    config = config or TrainConfig()
    _check_data(persona, config)
    tokenizer = _training_tokenizer(resolve_base_model(config.base_model))
    return token_budget(tokenizer, persona.examples, persona.train_system_prompt, config.max_length)


def training_pair_budget(persona: Persona, config: TrainConfig | None = None) -> BudgetReport | None:
    """The token budget of the persona's preference pairs as DPO will see them (see
    ``molting.preferences.preference_budget``); None for a persona without pairs."""
    config = config or TrainConfig()
    if not persona.preferences:
        return None
    tokenizer = _training_tokenizer(resolve_base_model(config.base_model))
    return preference_budget(tokenizer, persona.preferences, persona.train_system_prompt, config.max_length)


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


def _save(model, record: RunRecord, output_dir: Path, base_dir: Path | None = None) -> None:
    """``adapter/`` (LoRA) or, given the ``base_dir`` of a full fine-tune, ``model/``: the weights
    with the base's tokenizer files, as ``merge_adapter`` writes a merged model."""
    if base_dir is None:
        with atomic_path(output_dir / "adapter", directory=True) as tmp:
            model.save_pretrained(tmp, selected_adapters=["default"])
    else:
        from transformers import AutoTokenizer

        with atomic_path(output_dir / "model", directory=True) as tmp:
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
            for name in (SOURCE_FILE, "tokenizer.model"):
                if (base_dir / name).is_file():
                    shutil.copy2(base_dir / name, tmp / name)
    with atomic_path(output_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=2, ensure_ascii=False))


class _LossRecorder(TrainerCallback):
    """Appends each logged step (loss, DPO rewards, learning rate, grad norm) to ``entries``
    and reports progress."""

    KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
            "learning_rate", "grad_norm")

    def __init__(self, entries: list[dict], on_step: Callable[[int, int, dict], None] | None):
        self.entries, self.on_step = entries, on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 3)}
            entry.update({k: logs[k] for k in self.KEYS if k in logs})
            self.entries.append(entry)
            if self.on_step:
                self.on_step(state.global_step, state.max_steps, logs)
