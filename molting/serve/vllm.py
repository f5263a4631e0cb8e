"""The vLLM commands that serve the same personas from their PEFT adapters, past one machine.

vLLM (``vllm serve``, its OpenAI-compatible server) loads a base model once and applies
LoRA adapters per request: ``--enable-lora --lora-modules NAME=PATH ...`` makes each
``NAME`` a model id of the API, ``--max-loras`` adapters share one batch and
``--max-lora-rank`` bounds their rank (one of vLLM's allowed ranks, ``VLLM_LORA_RANKS``).
A fully fine-tuned persona is a model of its own: one ``vllm serve DIR`` for it.

vLLM applies the base's chat template, which does not carry the persona's system prompt:
clients send it (docs/serving.md). Not measured here: this machine has no GPU.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from molting.errors import ConfigError
from molting.persona import Persona

# vLLM's LoRAConfig.max_lora_rank choices (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def persona_weights(persona: Persona, runs: Path = Path("runs")) -> Path:
    """``runs/<slug>/adapter`` (LoRA) or ``runs/<slug>/model`` (full fine-tuning), whichever exists.

    Raises:
        ConfigError: neither exists.
    """
    for name in ("adapter", "model"):
        if (runs / persona.slug / name).is_dir():
            return runs / persona.slug / name
    raise ConfigError(
        f"{runs / persona.slug}: no adapter/ or model/ for {persona.name}; "
        "train with `molting run`, or name its weights with --model"
    )


def vllm_commands(personas: Sequence[Persona], weights: Sequence[Path], port: int = 8000) -> list[str]:
    """One ``vllm serve`` command per base model (with every adapter on it) and per full model.

    Args:
        personas: the personas; each one's slug is its model id in the API.
        weights: per persona, a peft adapter directory (``adapter_config.json``) or a model
            directory (``config.json``).
        port: the first command's port; each further command takes the next one.

    Raises:
        ConfigError: counts differ, or a directory is neither an adapter nor a model.
    """
    if len(personas) != len(weights):
        raise ConfigError(
            f"{len(personas)} personas but {len(weights)} weight directories; give one --model per persona"
        )
    adapters: dict[str, list[tuple[str, Path, int]]] = {}
    models: list[tuple[str, Path]] = []
    for persona, path in zip(personas, weights, strict=True):
        config = Path(path) / "adapter_config.json"
        if config.is_file():
            lora = json.loads(config.read_text())
            base = lora.get("base_model_name_or_path") or ""
            adapters.setdefault(base, []).append((persona.slug, Path(path), int(lora.get("r", 8))))
        elif (Path(path) / "config.json").is_file():
            models.append((persona.slug, Path(path)))
        else:
            raise ConfigError(
                f"{path}: neither a peft adapter (adapter_config.json) nor a model directory (config.json)"
            )
    commands = [_lora_command(base, group, port + i) for i, (base, group) in enumerate(adapters.items())]
    for slug, path in models:
        port_n = port + len(commands)
        commands.append(shlex.join(["vllm", "serve", str(path), "--served-model-name", slug, "--port", str(port_n)]))
    return commands


def _lora_command(base: str, group: list[tuple[str, Path, int]], port: int) -> str:
    if not base:
        raise ConfigError(f"{group[0][1]}/adapter_config.json names no base_model_name_or_path")
    r = max(rank for _, _, rank in group)
    max_rank = next((allowed for allowed in VLLM_LORA_RANKS if allowed >= r), None)
    if max_rank is None:
        raise ConfigError(f"LoRA rank {r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    args = ["vllm", "serve", base, "--port", str(port), "--enable-lora", "--lora-modules"]
    args += [f"{slug}={path}" for slug, path, _ in group]
    args += ["--max-loras", str(len(group)), "--max-lora-rank", str(max_rank)]
    return shlex.join(args)
