"""transformers engine: fp32, bf16 or bitsandbytes 4-bit, with a LoRA adapter applied or merged."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from molting.backends.base import Backend, Chunk, GenerationConfig, Message
from molting.errors import ConfigError
from molting.models import resolve_base_model

DType = Literal["fp32", "bf16", "4bit"]
DTYPES = ("fp32", "bf16", "4bit")
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
        model: embedded name or local model directory (see molting.models.resolve_base_model).
        adapter: optional peft adapter directory, applied on top of ``model``.
        dtype: "fp32", "bf16" or "4bit" (bitsandbytes NF4; CUDA only).
        merge: fold the adapter into the weights (faster decode; not with "4bit").
        device: "cpu" or "cuda"; default cuda when available.

    Raises:
        ConfigError: unknown dtype, 4-bit without CUDA, merging into a 4-bit base.
    """

    name = "transformers"

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        adapter: str | Path | None = None,
        dtype: DType = "fp32",
        merge: bool = False,
        device: str | None = None,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} not in {DTYPES}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "4bit" and self.device != "cuda":
            raise ConfigError("dtype='4bit' needs CUDA (bitsandbytes); use 'fp32' or 'bf16' on CPU")
        if merge and dtype == "4bit":
            raise ConfigError("merge=True into a 4-bit base loses the adapter's precision; use fp32/bf16")
        model_dir = resolve_base_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = _load(model_dir, dtype, self.device)
        if adapter is not None:
            self.model = _apply_adapter(self.model, Path(adapter), merge)
        self.model.eval()
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config.eos_token_id)

    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield the answer as ``generate`` decodes it (in a worker thread); see :meth:`Backend.stream`."""
        inputs = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(self.device)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        streamer = _TokenQueue()
        kwargs = dict(**inputs, streamer=streamer, **self._sampling(config, prompt_tokens))
        worker = threading.Thread(target=self._generate, args=(kwargs, config.seed, streamer))
        worker.start()
        ids: list[int] = []
        sent = ""
        for token in streamer:
            if token in self.stop_ids:
                break
            ids.append(token)
            text = self._decode(ids)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            yield Chunk(text[len(sent) :], prompt_tokens, len(ids))
            sent = text
        worker.join()
        if streamer.error is not None:
            raise streamer.error
        reason = "length" if len(ids) >= config.max_new_tokens else "stop"
        # The rest: bytes that never completed a character stay U+FFFD.
        yield Chunk(self._decode(ids)[len(sent) :], prompt_tokens, len(ids), finish_reason=reason)

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
            options.update(temperature=config.temperature, top_p=config.top_p)
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

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def _load(model_dir: Path, dtype: DType, device: str):
    if dtype == "4bit":
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=nf4, device_map={"": 0}, dtype=torch.bfloat16
        )
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)


def _apply_adapter(model, adapter: Path, merge: bool):
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json (make one with `molting train`)")
    model = PeftModel.from_pretrained(model, adapter)
    return model.merge_and_unload() if merge else model
