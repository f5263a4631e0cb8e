"""The one interface every inference engine implements.

A backend implements a single method, :meth:`Backend.stream`, which yields
:class:`Chunk` objects as tokens are decoded (the layering of mlx-lm's
``stream_generate``). :meth:`Backend.generate` and :meth:`Backend.chat` are built
on it once, here, so that every engine means the same thing by the same options.
"""

from __future__ import annotations

import abc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from molting.errors import ConfigError

Message = dict[str, str]
FinishReason = Literal["stop", "length"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options, identical in meaning for every backend.

    Attributes:
        max_new_tokens: upper bound on generated tokens.
        temperature: 0 means greedy decoding; > 0 samples.
        top_p: nucleus-sampling mass, in (0, 1]; ignored when greedy.
        repetition_penalty: CTRL-style penalty (Keskar et al., 2019) on the tokens generated so
            far, never on the prompt (llama.cpp's semantics, which transformers' default
            does not share): penalising the prompt pushes the model away from the very facts
            the persona's system prompt states. 1.0 disables it. The default 1.1 is the one
            molting's rubric evaluates with, so that ``Persona.chat`` answers as the evaluated
            model did; the research log used 1.3, and on SmolLM2-135M 1.3 pushed the model off its
            own words: the same GGUF's answers held invented words in 20 of 24 rubric answers at
            1.3 and 11 at 1.1, and scored 3.3 against 4.5/10 (experiments/RECIPES.md).
        seed: RNG seed for sampling, so that runs repeat.
        top_k: sample among the ``top_k`` most likely tokens; 0 disables it (llama.cpp's
            meaning; transformers' own default of 50 is not used). ``top_k=1`` is greedy.
        stop: strings that end the answer; the first one generated is cut off with
            everything after it, and the finish reason is "stop" (OpenAI's and llama.cpp
            server's semantics). Matched on the decoded text, so a stop string may span tokens.

    Where the engines differ: llama.cpp applies ``top_p`` before the temperature and
    transformers after it, so with ``temperature != 1`` the two sample from slightly
    different nuclei. Greedy decoding, ``top_k`` and the repetition penalty agree.
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: int = 0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"stop must hold non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)


@dataclass(frozen=True)
class Chunk:
    """One step of a stream.

    Attributes:
        text: newly decoded text (may be empty while a multi-byte character is pending).
        prompt_tokens: tokens in the rendered prompt.
        generated_tokens: tokens generated so far, this step included.
        finish_reason: None while streaming; "stop" (EOS) or "length" on the last chunk.
    """

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Memory:
    """Memory in use, in MiB (2**20 bytes).

    Attributes:
        rss_mib: resident set size of the whole process now (Linux ``VmRSS``).
        peak_rss_mib: the process's highest RSS so far (``VmHWM``; ``ru_maxrss`` off Linux).
        vram_mib: GPU memory the backend holds now; None when it uses no GPU.
        peak_vram_mib: the backend's highest GPU memory since it was created; None without a GPU.
    """

    rss_mib: float
    peak_rss_mib: float
    vram_mib: float | None = None
    peak_vram_mib: float | None = None


@dataclass(frozen=True)
class Response:
    """A finished generation.

    Attributes:
        text: the answer, without template tokens.
        finish_reason: "stop" if the model ended by itself, "length" if cut at max_new_tokens.
        prompt_tokens, completion_tokens: token counts.
        ttft_s: seconds from the call to the first generated token.
        total_s: seconds for the whole call.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    extra: dict = field(default_factory=dict)


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ConfigError unless messages is a non-empty list of {role, content} dicts."""
    if not messages:
        raise ConfigError("messages is empty")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ConfigError(f"messages[{i}].role is {m.get('role')!r}; allowed: {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}].content must be a string")


def stop_at(chunks: Iterator[Chunk], stop: Sequence[str]) -> Iterator[Chunk]:
    """Pass ``chunks`` through, ending at the first stop string (which is not yielded).

    Text that could be the beginning of a stop string is held back until the next chunk
    tells; on a match the last chunk carries the text before it and ``finish_reason``
    "stop", and ``chunks`` is closed, so that the engine stops generating.

    Args:
        chunks: an engine's stream.
        stop: the stop strings (GenerationConfig.stop); empty passes everything through.
    """
    if not stop:
        yield from chunks
        return
    held = ""
    try:
        for chunk in chunks:
            held += chunk.text
            before, found = cut_at_stop(held, stop)
            if found:
                yield replace(chunk, text=before, finish_reason="stop")
                return
            keep = 0 if chunk.finish_reason else _partial_stop(held, stop)
            yield replace(chunk, text=held[: len(held) - keep])
            held = held[len(held) - keep :]
    finally:
        if hasattr(chunks, "close"):
            chunks.close()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found (see GenerationConfig.stop)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def process_memory() -> tuple[float, float]:
    """This process's resident set size now and at its peak, in MiB.

    Linux's ``/proc/self/status`` (VmRSS, VmHWM); elsewhere ``ru_maxrss`` for both.
    """
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
        return peak, peak


class Backend(abc.ABC):
    """An inference engine. Subclasses implement :meth:`stream`; the rest is optional.

    Besides :meth:`stream`, an engine may give :meth:`count_tokens` (with its own
    tokenizer), :meth:`vram` (its GPU memory) and :meth:`close`.
    """

    name: str = "backend"
    # Conversations answered in one engine call by generate_batch; 1: one after another.
    batch_size: int = 1
    # The context window in tokens (prompt + answer) the engine serves; None when unknown.
    n_ctx: int | None = None

    @abc.abstractmethod
    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield chunks of the assistant's answer to ``messages``.

        The chat template is applied by the engine; the yielded text never holds
        template tokens. The last chunk carries ``finish_reason``. An engine honours
        ``config.stop`` by passing its chunks through :func:`stop_at`, and stops
        generating when the returned iterator is closed early.
        """

    def generate(self, messages: Sequence[Message], config: GenerationConfig | None = None, **options) -> Response:
        """Join :meth:`stream` into a :class:`Response`. ``options`` override ``config``."""
        config = replace(config or GenerationConfig(), **options)
        validate_messages(messages)
        start = time.perf_counter()
        ttft, parts, last = None, [], None
        for chunk in self.stream(messages, config):
            if ttft is None and chunk.generated_tokens > 0:
                ttft = time.perf_counter() - start
            parts.append(chunk.text)
            last = chunk
        total = time.perf_counter() - start
        if last is None:
            raise RuntimeError(f"{self.name}: stream() yielded nothing")
        return Response(
            text="".join(parts).strip(),
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.generated_tokens,
            ttft_s=ttft if ttft is not None else total,
            total_s=total,
        )

    def generate_batch(
        self,
        conversations: Sequence[Sequence[Message]],
        config: GenerationConfig | None = None,
        progress: Callable[[int], None] | None = None,
        **options,
    ) -> list[Response]:
        """Answer many conversations, ``batch_size`` per engine call; ``options`` override ``config``.

        An engine that decodes a batch at once (transformers) answers ``batch_size``
        conversations per call; the others answer them one after another. A sampled batch
        draws from one RNG seeded with ``config.seed``, so a row's sample depends on the
        batch it was drawn in; greedy answers do not.

        Args:
            conversations: the message lists, each as for :meth:`generate`.
            config: decoding, the same for every conversation.
            progress: called with the number of conversations answered after each engine call.

        Returns:
            One Response per conversation, in order. In a batch, ``ttft_s`` is the time to the
            batch's first token and ``total_s`` the whole batch's time.
        """
        config = replace(config or GenerationConfig(), **options)
        for messages in conversations:
            validate_messages(messages)
        size = max(1, self.batch_size)
        responses: list[Response] = []
        for start in range(0, len(conversations), size):
            responses += self._generate_batch(conversations[start : start + size], config)
            if progress is not None:
                progress(len(responses))
        return responses

    def _generate_batch(self, conversations: Sequence[Sequence[Message]], config: GenerationConfig) -> list[Response]:
        """One engine call's answers; engines that batch override it."""
        return [self.generate(messages, config) for messages in conversations]

    def chat(
        self,
        messages: Sequence[Message],
        max_new_tokens: int = GenerationConfig.max_new_tokens,
        temperature: float = GenerationConfig.temperature,
        top_p: float = GenerationConfig.top_p,
        repetition_penalty: float = GenerationConfig.repetition_penalty,
        seed: int = GenerationConfig.seed,
        top_k: int = GenerationConfig.top_k,
        stop: Sequence[str] = GenerationConfig.stop,
    ) -> str:
        """Answer ``messages`` and return the text only. Options as in GenerationConfig."""
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            top_k=top_k,
            stop=tuple(stop),
        )
        return self.generate(messages, config).text

    def count_tokens(self, text: str | Sequence[Message]) -> int:
        """Tokens in ``text`` with the model's own tokenizer.

        Args:
            text: a string (its tokens alone: no chat template, no BOS), or messages
                (the prompt :meth:`stream` would send: chat template, generation prompt
                and BOS where the model adds one; equal to ``Chunk.prompt_tokens``).

        Raises:
            NotImplementedError: the engine has no tokenizer of its own.
        """
        raise NotImplementedError(f"{self.name} does not count tokens")

    def vram(self) -> tuple[float, float] | None:
        """GPU memory this backend holds now and at its peak, in MiB; None when it uses no GPU."""
        return None

    def memory(self) -> Memory:
        """The process's RSS and the backend's GPU memory, now and at their peaks (see :class:`Memory`)."""
        rss, peak_rss = process_memory()
        vram = self.vram()
        return Memory(rss, peak_rss, *(vram or (None, None)))

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Free the engine's memory, so that :meth:`memory` falls back. Idempotent."""
