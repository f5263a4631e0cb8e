"""Export's own path: merge → GGUF F16 → quantize → check → ``--quant auto``, in one place.

:func:`export_model` is what ``molting export`` and ``molting run`` both call: it takes a
trained model (a LoRA adapter, or a fully fine-tuned or merged model directory), merges an
adapter into its base when there is one, writes the GGUF with the persona's prompt inside,
quantizes it and checks every file against the merged model (``molting.export.verify``).
:func:`export_gguf` is the same path from a merged model, :func:`export_adapter_gguf` the
adapter alone for llama.cpp's ``--lora``.

Every file an export completes is removed again if a later step fails; a user's own files
beside the target are never overwritten (see :func:`_names`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molting.errors import ConfigError, ExportError
from molting.export.adapter import write_lora_gguf
from molting.export.gguf import write_gguf
from molting.export.merge import merge_adapter
from molting.export.quantize import QUANT_TYPES, quantize
from molting.export.verify import (
    AUTO_CANDIDATES,
    FileCheck,
    VerifyConfig,
    VerifyReport,
    check_unquantized,
    choose_quant,
    compare_gguf,
    persona_texts,
    reference_logprobs,
    stop_and_leak,
)
from molting.models import resolve_base_model
from molting.persona import Persona


def is_full_model(weights: Path) -> bool:
    """True for a model directory with its own weights (``model/``, ``merged/``), False for a LoRA adapter."""
    return not (weights / "adapter_config.json").is_file() and (weights / "config.json").is_file()


def merge(base: str | Path, adapter: Path, out: Path, ui) -> Path:
    """Merge the LoRA ``adapter`` into a full-precision copy of ``base`` at ``out`` (``merge_adapter``)."""
    ui.step("Merging the adapter into a full-precision copy of the base")
    return merge_adapter(resolve_base_model(base), adapter, out)


def export_model(
    persona: Persona,
    weights: Path,
    target: Path | Callable[[str], Path],
    quant: str,
    ui,
    *,
    base: str | Path,
    rubric: Any = None,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
    keep_f16: bool = False,
    adapter_only: bool = False,
) -> ExportResult:
    """Export a trained model of ``persona`` to GGUF: merge if it is an adapter, write, quantize, check.

    Args:
        persona: names the file and supplies the system prompt baked into its chat template.
        weights: ``molting train``'s ``adapter/`` (LoRA: merged into ``base`` in a temporary
            directory beside the target, removed after), or a full model directory (``model/``
            of full fine-tuning, a run's ``merged/``: exported as it is).
        target: the ``.gguf`` to write, or a function of the quant type giving it (see
            :func:`export_gguf`).
        quant: a ``QUANT_TYPES`` key or ``"auto"`` (see :func:`export_gguf`).
        ui: progress: ``step``, ``bar`` and ``verify(report)``.
        base: the base model (embedded name or directory) an adapter was trained on.
        rubric: the persona's loaded rubric, for the check's text (needed unless ``verify`` is None).
        verify: the check's settings; None skips it.
        keep_f16: keep the F16 intermediate beside the target.
        adapter_only: write only the adapter as llama.cpp's adapter GGUF (:func:`export_adapter_gguf`).

    Raises:
        ConfigError: ``adapter_only`` for a fully fine-tuned model (it has no adapter).
        ExportError: a step or the check fails (nothing half-written is left).
    """
    weights = Path(weights)
    full = is_full_model(weights)
    if adapter_only:
        if full:
            raise ConfigError(f"{weights}: a fully fine-tuned model has no LoRA adapter (train with --finetuning lora)")
        return export_adapter_gguf(persona, resolve_base_model(base), weights, Path(target), ui, verify, rubric)
    if full:
        return export_gguf(persona, weights, target, quant, ui, keep_f16, verify, rubric)
    final = target(quant.upper()) if callable(target) else Path(target)
    with tempfile.TemporaryDirectory(dir=final.parent if final.parent.exists() else None) as tmp:
        merged = merge(base, weights, Path(tmp) / "merged", ui)
        return export_gguf(persona, merged, target, quant, ui, keep_f16, verify, rubric)


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote: the file, its type and its check (None with ``verify=None``)."""

    path: Path
    quant: str
    check: VerifyReport | None = None


def export_gguf(
    persona: Persona,
    merged: Path,
    target: Path | Callable[[str], Path],
    quant: str,
    ui,
    keep_f16: bool = False,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
    rubric: Any = None,
) -> ExportResult:
    """Write ``merged`` as GGUF F16 with ``persona``'s prompt inside, quantize it, and check the result.

    The check (``molting.export.verify``) compares every file written with the merged model on
    the persona's text; an F16 that fails it ends the export before quantization, and no file is
    left. The table is printed (``ui.verify``) and written beside the file as
    ``<stem>.verify.json``.

    Args:
        persona: supplies ``general.name``, the system prompt baked into the chat template,
            and the rubric and dataset the check runs on.
        merged: a merged model directory (``merge_adapter``).
        target: the final ``.gguf``, or a function of the quant type giving it (which names the
            ``auto`` choice by its type). The F16 intermediate is written beside it.
        quant: a ``molting.export.QUANT_TYPES`` key, or ``"auto"``: quantize to
            ``AUTO_CANDIDATES`` smallest first and keep the first whose mean KL is at most
            ``verify.auto_max_kl`` (the F16 if none is); ``"F16"`` writes ``target`` directly.
        ui: progress: ``step(title)``, ``bar(title, total)`` and ``verify(report)`` (see ``molting.pipeline.run``).
        keep_f16: keep the F16 intermediate next to ``target``.
        verify: the check's settings; None skips it (``--no-verify``).
        rubric: the persona's rubric (``molting.eval.rubric.Rubric``, as loaded once): its
            questions are part of the check's text. Needed unless ``verify`` is None.

    Raises:
        ExportError: the F16 fails the check, ``auto`` without ``verify``, a check without a
            rubric, or a step fails.
    """
    quant = quant.upper()
    if quant != "AUTO" and quant not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {quant!r}; allowed: auto, {', '.join(QUANT_TYPES)}")
    if quant == "AUTO" and verify is None:
        raise ExportError("--quant auto chooses by the check's numbers; it cannot run with --no-verify")
    if verify is not None and rubric is None:
        raise ExportError("the export's check reads the persona's rubric questions: pass the loaded rubric")
    final_for, name_for = _names(target, quant, persona.slug)
    f16 = name_for("F16")
    written: list[Path] = []  # files this export completed: removed again if it fails
    try:
        result = _write_and_check(persona, rubric, merged, f16, quant, name_for, ui, verify, written)
        final = final_for(result.quant)
        if result.path != final:
            result.path.replace(final)
            result.path = final
            written.append(final)
            if result.check is not None:
                result.check.get(result.quant).path = str(final)
        if result.check is not None:
            _stop_check(persona, rubric, result, ui, verify)
            result.check.write_json(final.with_name(f"{final.name.removesuffix('.gguf')}.verify.json"))
            ui.verify(result.check)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for path in written:
        if path == result.path:
            continue
        if keep_f16 and path == f16:
            path.replace(final_for("F16").with_name(f"{persona.slug}.F16.gguf"))
        else:
            path.unlink(missing_ok=True)
    return result


def _names(target: Path | Callable[[str], Path], quant: str, slug: str):
    """``(final_for, name_for)``: the final path of a quant type, and where it is first written.

    A fixed ``target`` is written directly when it is the asked type. Everything else (the F16
    intermediate, ``auto``'s candidates) is written under a private name beside it
    (``.<slug>.<QUANT>.<pid>.gguf``), so that no file a user already has there, such as an
    earlier export's ``<slug>.F16.gguf``, is overwritten or removed.
    """
    final_for = target if callable(target) else (lambda q: Path(target))

    def name_for(q: str) -> Path:
        if not callable(target) and q == quant:
            return Path(target)
        return final_for(q).with_name(f".{slug}.{q}.{os.getpid()}.gguf")

    return final_for, name_for


def _write_and_check(
    persona, rubric, merged: Path, f16: Path, quant: str, name_for, ui, verify, written
) -> ExportResult:
    """F16, its check, then the quantized file(s) and theirs; every file written goes into ``written``."""
    ui.step(f"Writing GGUF F16 with the chat template and {persona.name}'s system prompt")
    with ui.bar("GGUF F16", None) as advance:
        write_gguf(merged, f16, system_prompt=persona.system_prompt, name=persona.name, progress=advance)
    written.append(f16)
    checker = _Checker(persona, rubric, merged, ui, verify) if verify else None
    report = checker.report if checker else None
    if checker:
        check_unquantized(checker.check(f16, "F16"), verify)
    if quant == "F16":
        return ExportResult(f16, "F16", report)
    candidates = AUTO_CANDIDATES if quant == "AUTO" else (quant,)
    for candidate in candidates:
        path = _quantize(f16, name_for(candidate), candidate, ui, written)
        if quant != "AUTO":
            if checker:
                checker.check(path, candidate)
            return ExportResult(path, candidate, report)
        if checker.check(path, candidate).mean_kl <= verify.auto_max_kl:
            break
    chosen = choose_quant(report.files, verify.auto_max_kl) or report.get("F16")
    report.chosen, report.auto_max_kl = chosen.quant, verify.auto_max_kl
    return ExportResult(Path(chosen.path), chosen.quant, report)


def _quantize(f16: Path, path: Path, quant: str, ui, written: list[Path]) -> Path:
    ui.step(f"Quantizing to {quant} with llama.cpp's quantizer")
    with ui.bar(f"GGUF {quant}", None) as advance:
        quantize(f16, path, quant, progress=advance)
    written.append(path)
    return path


class _Checker:
    """The reference distributions, computed once, and each file's comparison with them."""

    def __init__(self, persona: Persona, rubric: Any, merged: Path, ui, verify: VerifyConfig):
        from transformers import AutoTokenizer

        self.ui, self.verify = ui, verify
        ui.step("Behaviour check: next-token distributions of the merged model on the persona's text")
        tokenizer = AutoTokenizer.from_pretrained(merged)
        self.texts = persona_texts(persona, rubric, tokenizer, verify.max_positions)
        self.reference = reference_logprobs(merged, self.texts)
        positions = sum(len(ids) - start for ids, start in self.texts)
        self.report = VerifyReport("the merged transformers model (fp32)", len(self.texts), positions)

    def check(self, path: Path, quant: str, lora_path: Path | None = None) -> FileCheck:
        """Compare ``path`` (with the adapter ``lora_path`` applied, when given: the check is then its)."""
        self.ui.step(f"Behaviour check: {quant} in llama.cpp against the merged model")
        top1, mean_kl, max_kl = compare_gguf(path, self.texts, self.reference, self.verify.n_threads, lora_path)
        checked = lora_path or path
        check = FileCheck(quant, str(checked), checked.stat().st_size, top1, mean_kl, max_kl)
        self.report.files.append(check)
        return check


def export_adapter_gguf(
    persona: Persona,
    base_dir: Path,
    adapter: Path,
    target: Path,
    ui,
    verify: VerifyConfig | None = VerifyConfig(),  # noqa: B008 (frozen dataclass)
    rubric: Any = None,
) -> ExportResult:
    """Write a LoRA adapter as llama.cpp's adapter GGUF (``write_lora_gguf``) and check it.

    The check merges the adapter into the base and writes the base as F16 GGUF, both in a
    temporary directory beside ``target``, then compares base F16 + adapter in llama.cpp with
    the merged model in transformers under the F16 gate (``check_unquantized``); a failure
    removes ``target``. The table is printed and saved as ``<stem>.verify.json``.

    Args:
        persona: names the file (``general.name``) and supplies the text of the check.
        base_dir: the base model directory the adapter was trained on.
        adapter: the peft adapter directory.
        target: the adapter ``.gguf``.
        ui: ``step``, ``bar`` and ``verify(report)``, as for :func:`export_gguf`.
        verify: the check's settings; None skips it.
        rubric: the persona's rubric, as for :func:`export_gguf`.

    Raises:
        ExportError: the adapter does not fit the base, or base + adapter fails the check.
    """
    target = Path(target)
    ui.step(f"Writing {persona.name}'s LoRA adapter as a llama.cpp adapter GGUF")
    with ui.bar("LoRA adapter GGUF", None) as advance:
        write_lora_gguf(adapter, base_dir, target, name=persona.name, progress=advance)
    if verify is None:
        return ExportResult(target, "LoRA", None)
    if rubric is None:
        raise ExportError("the export's check reads the persona's rubric questions: pass the loaded rubric")
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            merged = merge_adapter(base_dir, adapter, Path(tmp) / "merged")
            ui.step("Writing the base as GGUF F16, for the check")
            with ui.bar("GGUF F16 (base)", None) as advance:
                base_gguf = write_gguf(base_dir, Path(tmp) / "base.F16.gguf", progress=advance)
            checker = _Checker(persona, rubric, merged, ui, verify)
            check_unquantized(checker.check(base_gguf, "F16 + LoRA", lora_path=target), verify)
        checker.report.write_json(target.with_name(f"{target.name.removesuffix('.gguf')}.verify.json"))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    ui.verify(checker.report)
    return ExportResult(target, "LoRA", checker.report)


def _stop_check(persona: Persona, rubric: Any, result: ExportResult, ui, verify: VerifyConfig) -> None:
    """The stop-and-leak test on the file the export keeps; a failure is reported, not raised."""
    from molting.backends.llamacpp import LlamaCppBackend

    ui.step(f"Behaviour check: do {result.quant}'s answers stop by themselves, without template tokens?")
    backend = LlamaCppBackend(result.path, n_ctx=2048, n_threads=verify.n_threads)
    try:
        stop = stop_and_leak(backend, persona, rubric, verify.generation)
    finally:
        backend.close()
    result.check.get(result.quant).stop = stop
