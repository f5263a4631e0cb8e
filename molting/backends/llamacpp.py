"""llama.cpp engine through llama-cpp-python: a GGUF file, ``n_ctx``, ``n_gpu_layers``.

The prompt is rendered with the chat template stored in the GGUF
(``tokenizer.chat_template``) by llama-cpp-python's Jinja2 formatter, tokenized with
special tokens parsed, and decoded token by token with ``Llama.generate``, so token
counts, TTFT and finish reasons are exact. Generation ends at any end-of-generation
token of the vocabulary (llama.cpp's ``llama_vocab_is_eog``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from molting.backends.base import Backend, Chunk, GenerationConfig, Message
from molting.errors import ConfigError


class LlamaCppBackend(Backend):
    """Generate with llama.cpp from a GGUF file.

    Args:
        model_path: the ``.gguf`` file.
        n_ctx: context window in tokens (prompt + answer); 0 = the model's training context.
            ``stream`` refuses a prompt that does not leave room for ``max_new_tokens``.
        n_gpu_layers: transformer blocks offloaded to the GPU; 0 = CPU only, -1 = all.
        n_threads: CPU threads for decoding; None lets llama-cpp-python choose.
        n_threads_batch: CPU threads for prefill (prompt processing); None = ``n_threads``
            when that is given, else every core.
        lora_path: a LoRA adapter GGUF (``molting export --adapter-only``) applied to
            ``model_path``, which must be the base it was trained on.
        lora_scale: the adapter's weight: 1.0 applies it as trained (``lora_alpha / r``).

    Raises:
        ConfigError: the file or the adapter is missing, llama.cpp refuses the adapter
            (another base), or the model has no chat template.
    """

    name = "llama.cpp"

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        lora_path: str | Path | None = None,
        lora_scale: float = 1.0,
    ):
        self.model_path = Path(model_path)
        for path, made_by in ((self.model_path, "molting export"), (lora_path, "molting export --adapter-only")):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{path}: GGUF file not found (make one with `{made_by}`)")
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch or n_threads,
                lora_path=str(lora_path) if lora_path is not None else None,
                lora_scale=lora_scale,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's errors for a file or adapter it refuses
            what = f"{self.model_path} with the adapter {lora_path}" if lora_path else str(self.model_path)
            raise ConfigError(f"llama.cpp refused {what}: {exc}") from None
        # llama-cpp-python 0.3.x checks the adapter handle with ``is None``, but a refused
        # adapter comes back as a NULL pointer object: test its truth value instead.
        if lora_path is not None and not self.llm._lora_adapter:
            self.llm.close()
            raise ConfigError(
                f"llama.cpp refused the adapter {lora_path} for {self.model_path}: not a LoRA adapter GGUF, "
                "or made for another base (its log says which; `molting export --adapter-only` makes one)"
            )
        # The window asked for (n_ctx=0: the model's). llama.cpp may pad its own context
        # (``llm.n_ctx()``, e.g. to 256), but llama-cpp-python's token buffer holds only this.
        self.n_ctx = self.llm.context_params.n_ctx
        self.llm.last_n_tokens_size = self.n_ctx  # the repetition penalty sees the whole window
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConfigError(f"{self.model_path}: no tokenizer.chat_template in the GGUF metadata")
        model = self.llm._model
        self.formatter = Jinja2ChatFormatter(
            template,
            eos_token=model.token_get_text(model.token_eos()),
            bos_token=model.token_get_text(model.token_bos()),
        )
        self.system_prompt = self.llm.metadata.get("molting.system_prompt")

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The token ids of ``messages`` rendered with the GGUF's chat template."""
        prompt = self.formatter(messages=list(messages)).prompt
        add_bos = self.llm._model.add_bos_token()
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield the answer as it is decoded; see :meth:`Backend.stream`.

        Raises:
            ConfigError: prompt tokens + ``max_new_tokens`` exceed ``n_ctx``.
        """
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
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def _sampling(config: GenerationConfig) -> dict:
    """GenerationConfig in llama.cpp's terms: no top-k, no min-p, as transformers does here."""
    return dict(
        temp=config.temperature,
        top_p=config.top_p if config.temperature > 0 else 1.0,
        top_k=0,
        min_p=0.0,
        repeat_penalty=config.repetition_penalty,
    )


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
