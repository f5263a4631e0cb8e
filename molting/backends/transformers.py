"""transformers engine: fp32, bf16 or bitsandbytes 4-bit, with a LoRA adapter applied or merged."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from molting.backends.base import Backend, Chunk, GenerationConfig, Message, Response, cut_at_stop, stop_at
from molting.errors import ConfigError, ModelFileError
from molting.modelfiles import check_adapter_dir
from molting.models import resolve_base_model

DType = Literal["fp32", "bf16", "4bit"]
DTYPES = ("fp32", "bf16", "4bit")
Loader = Literal["molting", "transformers"]
LOADERS = ("molting", "transformers")
# Tokens that llama.cpp ends generation at by their text, besides EOS (its
# src/llama-vocab.cpp); stopping at the same ones keeps both engines' answers alike.
END_OF_GENERATION_TOKENS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)


class TransformersBackend(Backend):
    """Generate with a transformers causal LM.

    Args:
        model: embedded name, local model directory or Hub id ``ORG/NAME[@REVISION]``
            (see molting.models.resolve_base).
        adapter: optional peft adapter directory, applied on top of ``model``.
        dtype: "fp32", "bf16" or "4bit" (bitsandbytes NF4, double-quantized, bf16 compute;
            CUDA, or CPU with bitsandbytes 0.50's CPU backend).
        merge: fold the adapter into the weights (faster decode; not with "4bit").
        device: "cpu" or "cuda"; default cuda when available.
        loader: for "4bit" only: "molting" quantizes tensor by tensor as it reads them
            (molting.backends.nf4, peak memory near the 4-bit footprint on every
            transformers version); "transformers" is ``from_pretrained`` with a
            BitsAndBytesConfig, for architectures whose checkpoints need transformers'
            own weight conversions, and for comparing the two.
        batch_size: conversations decoded together by :meth:`generate_batch` (left-padded).
            Default 16 on CPU, where a batch spreads the per-token cost of a small model
            (SmolLM2-135M fp32 on 2 cores: 0.62 s per 64-token answer at 16 against 2.9 s one by
            one); 1 on CUDA, where the batch's KV cache may not fit beside the weights on 4 GB.

    Where it differs from llama.cpp: the chat template is the tokenizer's
    (``tokenizer_config.json``), not the GGUF's; memory grows while generating (the KV
    cache is allocated as the answer grows, not for the whole ``n_ctx`` at load); the
    GPU figures of :meth:`memory` are torch's allocator (``memory_allocated``), without
    the CUDA context and the allocator's cache.

    Raises:
        ModelFileError: the model or adapter directory has no config or no weights, or a
            truncated safetensors file.
        ConfigError: unknown dtype or loader, merging into a 4-bit base.
    """

    name = "transformers"

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        adapter: str | Path | None = None,
        dtype: DType = "fp32",
        merge: bool = False,
        device: str | None = None,
        loader: Loader = "molting",
        batch_size: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} not in {DTYPES}")
        if loader not in LOADERS:
            raise ConfigError(f"loader {loader!r} not in {LOADERS}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or (1 if self.device.startswith("cuda") else 16)
        if merge and dtype == "4bit":
            raise ConfigError("merge=True into a 4-bit base loses the adapter's precision; use fp32/bf16")
        model_dir = resolve_base_model(model)
        self.model_path = Path(model_dir)
        if adapter is not None:
            check_adapter_dir(adapter)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = _load(model_dir, dtype, self.device, loader)
        if adapter is not None:
            self.model = _apply_adapter(self.model, Path(adapter), merge)
        self.model.eval()
        self.n_ctx = getattr(self.model.config, "max_position_embeddings", None)
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config.eos_token_id)

    def count_tokens(self, text: str | Sequence[Message]) -> int:
        """Tokens with the model's tokenizer; see :meth:`Backend.count_tokens`."""
        if isinstance(text, str):
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return int(self._prompt(text)["input_ids"].shape[1])

    def _prompt(self, messages: Sequence[Message]):
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        except jinja2.TemplateError as exc:
            message = " ".join(str(exc).split())[:200]
            raise ModelFileError(
                self.model_path, f"its chat template cannot be rendered ({type(exc).__name__}: {message})"
            ) from None

    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield the answer as ``generate`` decodes it (in a worker thread); see :meth:`Backend.stream`.

        Closing the stream early (a stop string, a consumer that stops reading, Ctrl-C)
        stops ``generate`` after its current token.
        """
        if self.model is None:
            raise ConfigError("this TransformersBackend is closed")
        return stop_at(self._stream(messages, config), config.stop)

    def _stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        inputs = self._prompt(messages).to(self.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        streamer, cancel = _TokenQueue(), threading.Event()
        kwargs = dict(
            **inputs,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
            **self._sampling(config, prompt_tokens),
        )
        worker = threading.Thread(target=self._generate, args=(kwargs, config.seed, streamer))
        worker.start()
        ids: list[int] = []
        sent = ""
        try:
            for token in streamer:
                if token in self.stop_ids:
                    break
                ids.append(token)
                text = self._decode(ids)
                if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                    continue
                yield Chunk(text[len(sent) :], prompt_tokens, len(ids))
                sent = text
        finally:
            cancel.set()
            worker.join()
        if streamer.error is not None:
            raise streamer.error
        reason = "length" if len(ids) >= config.max_new_tokens else "stop"
        # The rest: bytes that never completed a character stay U+FFFD.
        yield Chunk(self._decode(ids)[len(sent) :], prompt_tokens, len(ids), finish_reason=reason)

    def _generate_batch(self, conversations: Sequence[Sequence[Message]], config: GenerationConfig) -> list[Response]:
        """Decode ``conversations`` in one ``generate`` call, prompts left-padded to one width."""
        if self.model is None:
            raise ConfigError("this TransformersBackend is closed")
        if len(conversations) == 1:
            return [self.generate(conversations[0], config)]
        prompts = [self._prompt(m)["input_ids"][0] for m in conversations]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = prompt
            attention_mask[row, width - len(prompt) :] = 1
        first = _FirstToken()
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                streamer=first,
                **self._sampling(config, width),
            )
        total = time.perf_counter() - start
        ttft = (first.at - start) if first.at is not None else total
        return [
            self._response(row.tolist(), len(prompt), config, ttft, total)
            for row, prompt in zip(output[:, width:], prompts, strict=True)
        ]

    def _response(self, ids: list[int], prompt_tokens: int, config: GenerationConfig, ttft: float, total: float):
        """A batch row's Response: cut at its first end-of-generation token, then at a stop string."""
        ended = next((i for i, token in enumerate(ids) if token in self.stop_ids), None)
        ids = ids if ended is None else ids[:ended]
        text, stopped = cut_at_stop(self._decode(ids), config.stop)
        reason = "stop" if ended is not None or stopped or len(ids) < config.max_new_tokens else "length"
        return Response(text.strip(), reason, prompt_tokens, len(ids), ttft, total)

    def vram(self) -> tuple[float, float] | None:
        """torch's allocated CUDA memory now and its peak since this backend was created, in MiB.

        The peak is the allocator's process-wide statistic, reset when this backend is
        created; None on CPU.
        """
        if not self.device.startswith("cuda"):
            return None
        return torch.cuda.memory_allocated(self.device) / 2**20, torch.cuda.max_memory_allocated(self.device) / 2**20

    def close(self) -> None:
        """Drop the model, collect it, and give freed memory back (CUDA cache, glibc's heap)."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _malloc_trim()

    def _decode(self, ids: list[int]) -> str:
        """Text of generated ``ids``: special tokens dropped, spaces as generated (as llama.cpp)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _sampling(self, config: GenerationConfig, prompt_tokens: int) -> dict:
        """``generate`` options. The repetition penalty skips the prompt, as llama.cpp's does."""
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        sample = config.temperature > 0
        penalty = []
        if config.repetition_penalty != 1.0:
            penalty = [RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=prompt_tokens)]
        options = dict(
            max_new_tokens=config.max_new_tokens,
            do_sample=sample,
            logits_processor=LogitsProcessorList(penalty),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            eos_token_id=sorted(self.stop_ids),
        )
        if sample:
            options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        return options

    def _generate(self, kwargs: dict, seed: int, streamer: _TokenQueue) -> None:
        try:
            torch.manual_seed(seed)
            with torch.inference_mode():
                self.model.generate(**kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised in the consuming thread
            streamer.error = exc
        finally:
            streamer.end()


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` once ``event`` is set (the consumer closed the stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _FirstToken(BaseStreamer):
    """Records when ``generate`` produced its first new tokens (the prompt's ``put`` is skipped)."""

    def __init__(self):
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class _TokenQueue(BaseStreamer):
    """Receives new token ids from ``generate`` (the prompt is skipped) and iterates them."""

    def __init__(self):
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.prompt_seen = False
        self.error: Exception | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self.queue.get()) is not None:
            yield token


def _stop_ids(tokenizer: Any, eos_token_id: int | list[int] | None) -> set[int]:
    """Token ids that end an answer, the same set llama.cpp stops at for the exported GGUF.

    Args:
        tokenizer: the model's transformers tokenizer.
        eos_token_id: ``generation_config.eos_token_id`` (an id, a list of ids, or None).

    Returns:
        Those ids, the tokenizer's EOS and every token named in ``END_OF_GENERATION_TOKENS``.
    """
    ids = set(eos_token_id) if isinstance(eos_token_id, list) else {eos_token_id}
    vocab = tokenizer.get_vocab()
    ids |= {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_GENERATION_TOKENS if t in vocab}
    return ids - {None}


def _load(model_dir: Path, dtype: DType, device: str, loader: Loader):
    if dtype == "4bit":
        return _load_4bit(model_dir, device, loader)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)


def _load_4bit(model_dir: Path, device: str, loader: Loader):
    """NF4 with bf16 compute, by molting's streaming loader or by transformers' ``from_pretrained``."""
    from molting.backends.nf4 import NF4Config, load_nf4

    config = NF4Config()
    if loader == "molting":
        return load_nf4(model_dir, device, config)
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=config.compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=nf4, device_map={"": device}, dtype=config.compute_dtype
    )


def _malloc_trim() -> None:
    """Return the freed heap to the OS (glibc's ``malloc_trim``), so RSS falls after close; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _apply_adapter(model, adapter: Path, merge: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, adapter)
    return model.merge_and_unload() if merge else model
