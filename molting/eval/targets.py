"""The rubric over several models at once: ``molting eval --model A --model B ...``.

Typical targets are one fine-tuned model and its exports (the merged directory, the F16,
Q8_0 and Q4_K_M GGUFs); ``molting.eval.report.retention_table`` then shows what each
export kept of the first. Models are opened one at a time and closed before the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from molting.backends.base import Backend, GenerationConfig
from molting.errors import ConfigError
from molting.eval.conversations import DriftResult, ScriptSet, run_drift
from molting.eval.probes import ProbeResult, ProbeSet, run_probes
from molting.eval.rubric import Rubric, RubricResult, Sampling, evaluate

if TYPE_CHECKING:
    from molting.persona import Persona


def target_label(model: str | Path) -> str:
    """A short column name for ``model``.

    ``runs/claudio/claudio.Q4_K_M.gguf`` → ``"GGUF Q4_K_M"`` (the part before ``.gguf``
    after the last dot), a directory → its name (``merged``), an embedded name → itself.
    """
    path = Path(model)
    if path.suffix == ".gguf":
        return f"GGUF {path.stem.rsplit('.', 1)[-1]}"
    return path.name or str(model)


def training_config(model: str | Path) -> dict | None:
    """The ``config`` of the ``run.json`` that trained ``model``, if one lies beside it.

    ``molting train --out X`` and ``molting run --out X`` write ``X/run.json``; their
    adapter (``X/adapter``), merged model (``X/merged``) and GGUF (``X/*.gguf``) find it
    one level up. None for anything else (an embedded model, a base model directory).
    """
    path = Path(model)
    for candidate in (path / "run.json", path.parent / "run.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8")).get("config")
    return None


def target_labels(models: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[str]:
    """One distinct label per model: ``labels`` if given, else ``target_label`` (``#2``, ``#3`` on repeats).

    Raises:
        ConfigError: ``labels`` given but not one per model, or repeated.
    """
    if labels:
        if len(labels) != len(models) or len(set(labels)) != len(labels):
            raise ConfigError(f"--label: give one distinct label per --model ({len(models)}), got {list(labels)}")
        return list(labels)
    found: list[str] = []
    for model in models:
        label, n = target_label(model), 1
        while label in found:
            n += 1
            label = f"{target_label(model)} #{n}"
        found.append(label)
    return found


def evaluate_targets(
    persona: Persona,
    rubric: Rubric,
    models: dict[str, Callable[[], Backend]],
    config: GenerationConfig,
    sampling: Sampling,
    ui,
    probes: Sequence[ProbeSet] = (),
    probe_config: GenerationConfig | None = None,
    bare: bool = True,
    scripts: ScriptSet | None = None,
    drift_config: GenerationConfig | None = None,
    drift_sampling: Sampling | None = None,
) -> list[RubricResult]:
    """Evaluate each model in turn with the same decoding and sampling.

    Args:
        persona, rubric: as for ``evaluate``.
        models: label -> a function opening the model's Backend (called once, closed after).
        config, sampling: as for ``evaluate``, the same for every model.
        ui: progress reporter with ``step(title)`` and ``bar(title, total)`` (see ``molting.pipeline.run``).
        probes: held-out probe splits to ask each model too (``molting.eval.probes.load_probe_splits``),
            with the system prompt, and on a llama.cpp model also without it (a GGUF's template
            carries it); empty skips.
        probe_config: decoding of the probes (default ``config``).
        bare: on a llama.cpp model, ask the probes also without the system prompt (False: only with it).
        scripts: held-out conversations to hold with each model too (``molting.eval.conversations``);
            None skips. ``drift_config`` and ``drift_sampling`` are their decoding and runs
            (default ``config`` and ``sampling``).

    Returns:
        One RubricResult per model, in ``models``' order, its probes attached.
    """
    results = []
    for label, open_backend in models.items():
        ui.step(f"Rubric v{rubric.version} on {label} ({sampling.n} answer(s) per question)")
        backend = open_backend()
        try:
            with ui.bar(f"rubric: {label}", len(rubric.questions) * sampling.n) as advance:
                result = evaluate(
                    backend, persona, rubric, config, label=label, sampling=sampling, progress=advance
                )
            modes = (True, False) if bare and backend.name == "llama.cpp" else (True,)
            decoding = probe_config or config
            result.probes = [
                ask_probes(backend, persona, s, decoding, label, m, ui, rubric) for s in probes for m in modes
            ]
            if scripts is not None:
                decoding, runs = drift_config or config, drift_sampling or sampling
                result.drift = ask_conversations(backend, persona, scripts, decoding, runs, label, ui, rubric)
        finally:
            backend.close()
        results.append(result)
    return results


def ask_probes(
    backend, persona, probes: ProbeSet, config, label: str, system_prompt: bool, ui, rubric: Rubric | None = None
) -> ProbeResult:
    """``run_probes`` behind a progress bar titled by the model (and "no system prompt" when so)."""
    title = f"{probes.split} probes: {label}" + ("" if system_prompt else " (no system prompt)")
    with ui.bar(title, len(probes.probes)) as advance:
        return run_probes(
            backend,
            persona,
            probes,
            config,
            label=label,
            system_prompt=system_prompt,
            progress=advance,
            rubric=rubric,
        )


def ask_conversations(
    backend, persona, scripts: ScriptSet, config, sampling: Sampling, label: str, ui, rubric: Rubric | None = None
) -> DriftResult:
    """``run_drift`` behind a progress bar: every held-out conversation, greedy and sampled."""
    total = sum(len(s.turns) for s in scripts.scripts) * sampling.n
    with ui.bar(f"conversations: {label}", total) as advance:
        return run_drift(backend, persona, scripts, config, sampling, label=label, progress=advance, rubric=rubric)
