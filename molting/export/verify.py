"""Check an exported GGUF against the model it was written from, on the persona's own text.

Two measurements:

1. **Next-token distributions.** The persona's rubric questions and dataset conversations,
   rendered with the merged model's chat template and the persona's system prompt, are fed
   token by token to the merged transformers model (fp32: the reference) and to each GGUF in
   llama.cpp. At every position: whether both put the same token first (top-1 agreement),
   and the Kullback-Leibler divergence KL(P_ref || P_gguf) = sum_v P_ref(v) (log P_ref(v) -
   log P_gguf(v)) in nats, what ``llama-perplexity --kl-divergence`` reports. llama.cpp runs
   with an F32 KV cache here, so that the numbers measure the file and not the cache.
2. **Stop and leak.** Greedy answers to the rubric questions through the GGUF's own chat
   template (the persona's decoding): each must end with an end-of-generation token before
   ``max_new_tokens``, and contain no template tokens (``molting.eval.checks.leaked_tokens``).
   This is reported, not enforced: a model that rambles is the rubric's verdict, a broken
   file is this module's.

An F16 (or F32) file must agree with the reference on at least ``F16_MIN_TOP1`` of the
positions with a mean KL of at most ``F16_MAX_KL``. Rounding weights to half precision
stays far inside both (SmolLM2-135M on examples/claudio: 99.9% top-1, ~1e-5 nats); a
conversion error does not: in the tests, the same file without the Q/K permutation falls
below 90% top-1 and above 1e-2 nats.

``--quant auto`` (:func:`choose_quant`) takes the smallest of ``AUTO_CANDIDATES`` whose mean
KL stays at most ``AUTO_MAX_KL`` = 0.01 nats, a choice: on SmolLM2-135M with examples/claudio
(1024 positions; ``benchmarks/reports/export_check.md``) Q8_0 measured 0.0065 nats with
95.9% of the top-1 tokens kept, Q6_K 0.017 nats (92.5%), Q5_K_M 0.106 (81.5%) and Q4_K_M
0.092 (83.5%): 0.01 nats keeps files that change about one next token in twenty-five and
refuses those that change one in thirteen or more. It picks Q8_0 there. (SmolLM2's rows of
576 are no multiple of 256, so K-quant types fall back to others for most matrices; there
Q5_K_M measured worse than Q4_K_M.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molting.backends.base import GenerationConfig
from molting.data import with_system_prompt
from molting.errors import ExportError
from molting.eval.checks import leaked_tokens
from molting.io import atomic_path

F16_MIN_TOP1 = 0.99
F16_MAX_KL = 1e-3  # nats
# Reference log-probabilities this close count as a tie in top-1 agreement (see _same_top1).
TOP1_TIE_NATS = 0.01
AUTO_MAX_KL = 0.01  # nats
# Nominal bits per weight ascending (llama.cpp's tools/quantize): smallest first.
AUTO_CANDIDATES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
UNQUANTIZED = ("F16", "F32")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class VerifyConfig:
    """How an export is checked.

    Attributes:
        max_positions: next-token distributions compared per file. The reference's
            log-probabilities are kept in memory: ``max_positions x vocab_size x 4`` bytes
            (1024 x 49152 x 4 = 201 MB for SmolLM2).
        generation: decoding of the stop-and-leak replies (the persona's: greedy,
            repetition_penalty 1.1, 200 new tokens).
        f16_min_top1, f16_max_kl: the F16/F32 gate; below it the export fails.
        auto_max_kl: ``--quant auto``'s threshold on mean KL, nats.
        n_threads: llama.cpp threads; None lets llama-cpp-python choose.
    """

    max_positions: int = 1024
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    f16_min_top1: float = F16_MIN_TOP1
    f16_max_kl: float = F16_MAX_KL
    auto_max_kl: float = AUTO_MAX_KL
    n_threads: int | None = None


@dataclass
class StopCheck:
    """Stop-and-leak result of one file: ``stopped`` of ``replies`` ended by themselves."""

    replies: int
    stopped: int
    leaks: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # prompts whose reply hit max_new_tokens

    @property
    def ok(self) -> bool:
        return self.stopped == self.replies and not self.leaks


@dataclass
class FileCheck:
    """One GGUF against the reference.

    Attributes:
        quant: the file's type ("F16", "Q8_0", ...).
        path: the file as written (it may have been removed since, e.g. an ``auto`` candidate).
        size_bytes: its size.
        top1: fraction of positions where the GGUF's most likely next token is the reference's
            (or ties with it within ``TOP1_TIE_NATS``).
        mean_kl, max_kl: KL(P_ref || P_gguf) over the positions, nats.
        stop: the stop-and-leak result, when that test ran on this file.
    """

    quant: str
    path: str
    size_bytes: int
    top1: float
    mean_kl: float
    max_kl: float
    stop: StopCheck | None = None


@dataclass
class VerifyReport:
    """What an export's check measured; ``to_markdown`` is the table ``molting run`` reports."""

    reference: str
    texts: int
    positions: int
    files: list[FileCheck] = field(default_factory=list)
    auto_max_kl: float | None = None  # set when ``--quant auto`` chose
    chosen: str | None = None

    def get(self, quant: str) -> FileCheck:
        return next(f for f in self.files if f.quant == quant)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return path

    def rows(self) -> list[list[str]]:
        """The table's rows as strings: quant, size MiB, top-1, mean KL, max KL, stop & leak."""
        rows = []
        for f in self.files:
            stop = "not run"
            if f.stop is not None:
                stop = f"{f.stop.stopped}/{f.stop.replies} stopped, {len(f.stop.leaks)} leaks"
            mark = " (chosen)" if f.quant == self.chosen else ""
            rows.append(
                [
                    f.quant + mark,
                    f"{f.size_bytes / 2**20:.1f}",
                    f"{f.top1:.1%}",
                    f"{f.mean_kl:.5f}",
                    f"{f.max_kl:.3f}",
                    stop,
                ]
            )
        return rows

    def to_markdown(self) -> str:
        head = ["GGUF", "MiB", "same top-1", "mean KL (nats)", "max KL", "stop & leak"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        text = (
            f"Next-token distributions at {self.positions} positions of {self.texts} texts of the persona "
            f"(rubric questions, dataset conversations), each GGUF in llama.cpp against {self.reference}.\n\n"
            + "\n".join(lines)
            + "\n"
        )
        if self.chosen:
            text += (
                f"\n`--quant auto` chose **{self.chosen}**: the smallest of {', '.join(AUTO_CANDIDATES)} "
                f"with mean KL at most {self.auto_max_kl} nats.\n"
            )
        for f in self.files:
            if f.stop is not None and not f.stop.ok:
                text += f"\n{f.quant}: replies cut at the token limit: {f.stop.cut}; leaked: {f.stop.leaks}\n"
        return text


def persona_texts(persona: Any, rubric: Any, tokenizer: Any, max_positions: int) -> list[tuple[list[int], int]]:
    """Token ids of the persona's text, and from which position each text is scored.

    Rubric questions come first (system prompt, question, generation prompt), then whole
    dataset conversations behind the persona's system prompt, until ``max_positions``
    positions are taken (the last text is cut to fit). Positions a text shares with the
    first text (the system prompt) are scored once, in the first.

    Returns:
        ``[(ids, start)]``: score positions ``start .. len(ids) - 1`` of ``ids``.

    Raises:
        ExportError: the persona yields no text.
    """
    conversations = [(persona.messages(q.prompt), True) for q in rubric.questions]
    conversations += [(with_system_prompt(example, persona.system_prompt), False) for example in persona.examples]
    texts, taken = [], 0
    for messages, open_turn in conversations:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        start = _common_prefix(ids, texts[0][0]) if texts else 0
        start = min(start, len(ids) - 1)
        ids = ids[: start + max_positions - taken]
        texts.append((ids, start))
        taken += len(ids) - start
        if taken >= max_positions:
            break
    if not texts:
        raise ExportError(f"persona {persona.name!r} has no rubric questions and no examples to check the export on")
    return texts


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reference_logprobs(model_dir: Path, texts: list[tuple[list[int], int]]) -> list[np.ndarray]:
    """The merged model's next-token log-probabilities at the scored positions.

    Args:
        model_dir: the merged transformers model directory, loaded in float32.
        texts: from :func:`persona_texts`.

    Returns:
        One float32 array per text, shape ``(len(ids) - start, vocab_size)``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids, start in texts:
            logits = model(torch.tensor([ids])).logits[0, start:]
            out.append(torch.log_softmax(logits, dim=-1).numpy())
    del model
    return out


def compare_gguf(
    path: Path,
    texts: list[tuple[list[int], int]],
    reference: list[np.ndarray],
    n_threads: int | None = None,
    lora_path: Path | None = None,
) -> tuple[float, float, float]:
    """Top-1 agreement, mean and max KL (nats) of ``path`` against ``reference``.

    Args:
        path: a GGUF file of the same vocabulary as the reference.
        texts: the token ids and scored starts (:func:`persona_texts`).
        reference: :func:`reference_logprobs` on the same texts.
        n_threads: llama.cpp threads.
        lora_path: a LoRA adapter GGUF applied to ``path`` (scale 1).

    Raises:
        ExportError: llama.cpp cannot load the file or the adapter, or the vocabulary differs.
    """
    import llama_cpp

    longest = max(len(ids) for ids, _ in texts)
    what = f"{path} with {lora_path}" if lora_path else str(path)
    try:
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=longest,
            n_batch=min(512, longest),
            logits_all=True,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            lora_path=str(lora_path) if lora_path else None,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"llama.cpp cannot load {what}: {exc}") from None
    if lora_path and not llm._lora_adapter:  # see LlamaCppBackend: a refused adapter is a NULL pointer
        llm.close()
        raise ExportError(f"llama.cpp refused the adapter {lora_path} for {path}")
    same, kls = [], []
    try:
        if llm.n_vocab() != reference[0].shape[1]:
            raise ExportError(f"{path}: vocabulary of {llm.n_vocab()} tokens, the model's is {reference[0].shape[1]}")
        cached: list[int] = []
        for (ids, start), ref in zip(texts, reference, strict=True):
            # The KV cache holds the previous text: keep the prefix it shares with this one
            # (the system prompt) and evaluate the rest; eval drops the cache beyond n_tokens.
            llm.n_tokens = min(start, _common_prefix(cached, ids))
            llm.eval(ids[llm.n_tokens :])
            cached = ids
            logits = np.asarray(llm.scores[start : len(ids)], dtype=np.float64)
            logq = logits - _logsumexp(logits)
            ref = ref.astype(np.float64)
            kls.append(np.sum(np.exp(ref) * (ref - logq), axis=-1))
            same.append(_same_top1(ref, logits.argmax(-1)))
    finally:
        llm.close()
    kl = np.concatenate(kls)
    return float(np.concatenate(same).mean()), float(kl.mean()), float(kl.max())


def _same_top1(ref: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Per position: the GGUF's top token is the reference's, or ties with it within ``TOP1_TIE_NATS``.

    Args:
        ref: ``(positions, vocab)`` reference log-probabilities.
        picked: ``(positions,)`` the GGUF's most likely token ids.

    F16 rounding (about 1e-3 relative) can flip two tokens the reference scores alike; a
    position where the reference's log-probability of the GGUF's pick is within
    ``TOP1_TIE_NATS`` of its best is no disagreement. Small random test models have many
    such ties; trained models few.
    """
    best = ref.max(axis=-1)
    chosen = np.take_along_axis(ref, picked[:, None], axis=-1)[:, 0]
    return best - chosen <= TOP1_TIE_NATS


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def stop_and_leak(backend: Any, persona: Any, rubric: Any, generation: GenerationConfig) -> StopCheck:
    """Answer every rubric question with ``backend``; count replies that stop, collect leaks.

    Args:
        backend: a Backend (``LlamaCppBackend`` on the exported file).
        persona: supplies the system prompt (``persona.messages``).
        rubric: the questions.
        generation: the decoding; ``max_new_tokens`` is the limit a reply must stop before.
    """
    check = StopCheck(replies=len(rubric.questions), stopped=0)
    for question in rubric.questions:
        response = backend.generate(persona.messages(question.prompt), generation)
        if response.finish_reason == "stop":
            check.stopped += 1
        else:
            check.cut.append(question.prompt)
        check.leaks += [f"{question.prompt}: {token}" for token in leaked_tokens(response.text)]
    return check


def check_unquantized(check: FileCheck, config: VerifyConfig) -> None:
    """The F16/F32 gate.

    Raises:
        ExportError: top-1 agreement below ``config.f16_min_top1`` or mean KL above
            ``config.f16_max_kl``; the message gives both numbers and the thresholds.
    """
    if check.top1 < config.f16_min_top1 or check.mean_kl > config.f16_max_kl:
        raise ExportError(
            f"{check.path}: the {check.quant} GGUF does not compute what the model computes: same top-1 "
            f"{check.top1:.2%} (at least {config.f16_min_top1:.0%} required), mean KL {check.mean_kl:.2e} nats "
            f"(at most {config.f16_max_kl:.0e} allowed). This is a conversion error, not quantization; "
            "no file was written (`--no-verify` skips the check)"
        )


def choose_quant(checks: Sequence[FileCheck], max_kl: float) -> FileCheck | None:
    """The smallest file of ``checks`` whose mean KL is at most ``max_kl``; None if none is."""
    passing = [c for c in checks if c.mean_kl <= max_kl]
    return min(passing, key=lambda c: c.size_bytes) if passing else None
