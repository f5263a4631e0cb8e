"""llama.cpp engine through llama-cpp-python: a GGUF file, ``n_ctx``, ``n_gpu_layers``.

The prompt is rendered with the chat template stored in the GGUF
(``tokenizer.chat_template``) by llama-cpp-python's Jinja2 formatter, tokenized with
special tokens parsed, and decoded token by token with ``Llama.generate``, so token
counts, TTFT and finish reasons are exact. Generation ends at any end-of-generation
token of the vocabulary (llama.cpp's ``llama_vocab_is_eog``).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf
import jinja2
import llama_cpp
from jinja2.sandbox import SecurityError
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from molting.backends.base import Backend, Chunk, GenerationConfig, Message, stop_at
from molting.errors import ConfigError, ModelFileError
from molting.modelfiles import check_gguf


class LlamaCppBackend(Backend):
    """Generate with llama.cpp from a GGUF file.

    Args:
        model_path: the ``.gguf`` file; its header is checked (molting.modelfiles.check_gguf)
            before llama.cpp reads it.
        n_ctx: context window in tokens (prompt + answer); 0 = the model's training context.
            ``stream`` refuses a prompt that does not leave room for ``max_new_tokens``.
        n_gpu_layers: transformer blocks offloaded to the GPU; 0 = CPU only, -1 = all.
        n_threads: CPU threads for decoding; None lets llama-cpp-python choose.
        n_threads_batch: CPU threads for prefill (prompt processing); None = ``n_threads``
            when that is given, else every core.
        n_batch: prompt tokens llama.cpp evaluates per step during prefill (llama.cpp's
            default 512); the compute buffer grows with it.
        flash_attn: use flash attention. Needed for a quantized V cache.
        type_k, type_v: KV cache type, one of ``KV_CACHE_TYPES`` (llama.cpp's ``-ctk``/``-ctv``);
            "q8_0" halves the cache of "f16". A quantized ``type_v`` needs ``flash_attn``.
        lora_path: a LoRA adapter in llama.cpp's GGUF adapter format, applied at load.
            llama.cpp then reads the model without mmap (it copies the weights to RAM).
        lora_scale: the adapter's scale; 1.0 applies it as trained, 0.0 not at all.

    Where it differs from transformers: the chat template is the GGUF's, rendered by
    llama-cpp-python's Jinja2 formatter; all memory (weights, KV cache for ``n_ctx``,
    compute buffers) is allocated at load and does not grow while generating; the model is
    memory-mapped, so its weights count in RSS only once read.

    Raises:
        ModelFileError: the file is missing, truncated or corrupt, or llama.cpp cannot load it.
        ConfigError: an unknown KV cache type, a quantized V cache without flash attention,
            an adapter llama.cpp refuses, or no chat template in the GGUF.
    """

    name = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_batch: int = 512,
        flash_attn: bool = False,
        type_k: str = "f16",
        type_v: str = "f16",
        lora_path: str | Path | None = None,
        lora_scale: float = 1.0,
    ):
        self.model_path = Path(model_path)
        self.info = check_gguf(self.model_path)
        if lora_path is not None:
            check_gguf(lora_path)
        self.vram_meter = _VramMeter(n_gpu_layers)
        self.llm = self._open(
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch or n_threads,
            n_batch=n_batch,
            flash_attn=flash_attn,
            type_k=_kv_type(type_k, "type_k"),
            type_v=_kv_type(type_v, "type_v", flash_attn),
            lora_path=str(lora_path) if lora_path is not None else None,
            lora_scale=lora_scale,
        )
        self.vram_meter.read()  # llama.cpp has reserved all it will use
        # The window asked for (n_ctx=0: the model's). llama.cpp may pad its own context
        # (``llm.n_ctx()``, e.g. to 256), but llama-cpp-python's token buffer holds only this.
        self.n_ctx = self.llm.context_params.n_ctx
        self.llm.last_n_tokens_size = self.n_ctx  # the repetition penalty sees the whole window
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"{self.model_path}: no tokenizer.chat_template in the GGUF metadata")
        model = self.llm._model
        try:
            self.formatter = Jinja2ChatFormatter(
                template,
                eos_token=model.token_get_text(model.token_eos()),
                bos_token=model.token_get_text(model.token_bos()),
            )
            self.formatter(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except jinja2.TemplateError as exc:  # refused or broken at once, not at the first answer
            self.close()
            raise _template_error(self.model_path, exc) from None
        self.system_prompt = self.llm.metadata.get("molting.system_prompt")

    def _open(self, **params) -> llama_cpp.Llama:
        """``llama_cpp.Llama`` on the checked file; its ValueError becomes an error naming the file."""
        try:
            llm = llama_cpp.Llama(model_path=str(self.model_path), verbose=False, **params)
        except ValueError as exc:
            if params["lora_path"] and "LoRA" in str(exc):
                raise ConfigError(f"{params['lora_path']}: llama.cpp refused the LoRA adapter ({exc})") from None
            raise ModelFileError(
                self.model_path, f"llama.cpp could not load this {self.info.architecture} GGUF ({exc})"
            ) from None
        # llama-cpp-python 0.3.x checks the adapter handle with ``is None``, but a refused
        # adapter comes back as a NULL pointer object: test its truth value instead.
        if params["lora_path"] and not llm._lora_adapter:
            llm.close()
            raise ConfigError(
                f"llama.cpp refused the adapter {params['lora_path']} for {self.model_path}: not a LoRA adapter "
                "GGUF, or made for another base (`molting export --adapter-only` makes one)"
            )
        return llm

    def count_tokens(self, text: str | Sequence[Message]) -> int:
        """Tokens with the GGUF's tokenizer; see :meth:`Backend.count_tokens`."""
        self._check_open()
        if isinstance(text, str):
            return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        return len(self.prompt_tokens(text))

    def vram(self) -> tuple[float, float] | None:
        """The device's used memory above what it was before the load, in MiB; None on CPU.

        llama.cpp's allocations are invisible to torch, and llama.cpp reserves them all
        at load, so in use and peak are the same figure. Device-wide: other processes on
        the same GPU count too.
        """
        return self.vram_meter.read()

    def _check_open(self) -> None:
        if self.llm is None:
            raise ConfigError(f"{self.model_path}: this backend is closed")

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The token ids of ``messages`` rendered with the GGUF's chat template."""
        try:
            prompt = self.formatter(messages=list(messages)).prompt
        except jinja2.TemplateError as exc:
            raise _template_error(self.model_path, exc) from None
        add_bos = self.llm._model.add_bos_token()
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield the answer as it is decoded; see :meth:`Backend.stream`.

        Raises:
            ConfigError: prompt tokens + ``max_new_tokens`` exceed ``n_ctx``.
        """
        self._check_open()
        return stop_at(self._stream(messages, config), config.stop)

    def _stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        tokens = self.prompt_tokens(messages)
        if len(tokens) + config.max_new_tokens > self.n_ctx:
            raise ConfigError(
                f"prompt ({len(tokens)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds n_ctx ({self.n_ctx})"
            )
        self.llm.reset()  # no prompt cache between calls: every call is measured cold
        self.llm.set_seed(config.seed)
        vocab = self.llm._model.vocab
        raw, n_generated, sent, reason = b"", 0, "", "length"
        for token in self.llm.generate(tokens, **_sampling(config)):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            n_generated += 1
            raw += _piece(vocab, token)
            text = raw.decode("utf-8", errors="replace")
            if not text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                yield Chunk(text[len(sent) :], len(tokens), n_generated)
                sent = text
            if n_generated >= config.max_new_tokens:
                break
        # The rest: bytes that never completed a character end as U+FFFD, as in transformers.
        rest = raw.decode("utf-8", errors="replace")[len(sent) :]
        yield Chunk(rest, len(tokens), n_generated, finish_reason=reason)

    def close(self) -> None:
        """Free the model, the context and the adapter (llama.cpp's buffers and the mmap)."""
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def _template_error(path: Path, exc: Exception) -> ModelFileError:
    """The GGUF's chat template failed in jinja2's sandbox (an unsafe attribute, a syntax error)."""
    what = "refused by the template sandbox" if isinstance(exc, SecurityError) else "cannot be rendered"
    message = " ".join(str(exc).split())[:200]
    return ModelFileError(path, f"its tokenizer.chat_template {what} ({type(exc).__name__}: {message})")


def _sampling(config: GenerationConfig) -> dict:
    """GenerationConfig in llama.cpp's terms: no min-p, as transformers does here."""
    return dict(
        temp=config.temperature,
        top_p=config.top_p if config.temperature > 0 else 1.0,
        top_k=config.top_k,
        min_p=0.0,
        repeat_penalty=config.repetition_penalty,
    )


# llama.cpp's KV cache types (common/arg.cpp, ``kv_cache_types``), by their GGML names.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def _kv_type(name: str, field: str, flash_attn: bool = True) -> int:
    """The ggml type id of a KV cache type name.

    Raises:
        ConfigError: not in KV_CACHE_TYPES, or a quantized V cache without flash attention
            (llama.cpp refuses to create that context).
    """
    if name not in KV_CACHE_TYPES:
        raise ConfigError(f"{field} {name!r} not in {KV_CACHE_TYPES}")
    if not flash_attn and name not in ("f32", "f16", "bf16"):
        raise ConfigError(f"{field}={name!r} needs flash_attn=True (llama.cpp quantizes the V cache only with it)")
    return int(gguf.GGMLQuantizationType[name.upper()])


class _VramMeter:
    """GPU memory held by llama.cpp: the device's used memory now minus before the load, in MiB.

    Read with torch's ``cuda.mem_get_info`` when llama.cpp offloads layers to a GPU and a
    CUDA build of torch is there; otherwise nothing is measured (None).
    """

    def __init__(self, n_gpu_layers: int):
        self.torch = None
        if n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload():
            with contextlib.suppress(ImportError):
                import torch

                self.torch = torch if torch.cuda.is_available() else None
        self.free_before = self.torch.cuda.mem_get_info()[0] if self.torch else 0
        self.peak = 0.0

    def read(self) -> tuple[float, float] | None:
        if self.torch is None:
            return None
        used = (self.free_before - self.torch.cuda.mem_get_info()[0]) / 2**20
        self.peak = max(self.peak, used)
        return used, self.peak


def _piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes of ``token`` as generated text; control tokens render as b"".

    llama-cpp-python's ``detokenize`` cuts pieces longer than 32 bytes and drops a
    leading space after BOS; this asks ``llama_token_to_piece`` again with the size
    it reports (a negative return value) instead.
    """
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n
