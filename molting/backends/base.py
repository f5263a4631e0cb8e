"""The one interface every inference engine implements.

A backend implements a single method, :meth:`Backend.stream`, which yields
:class:`Chunk` objects as tokens are decoded (the layering of mlx-lm's
``stream_generate``). :meth:`Backend.generate` and :meth:`Backend.chat` are built
on it once, here, so that every engine means the same thing by the same options.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
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
            the persona's system prompt states. 1.0 disables it; the default 1.3 is the
            research log's setting and the one molting's rubric evaluates with, so that
            ``Persona.chat`` answers as the evaluated model did.
        seed: RNG seed for sampling, so that runs repeat.
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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


class Backend(abc.ABC):
    """An inference engine. Subclasses implement :meth:`stream` only."""

    name: str = "backend"

    @abc.abstractmethod
    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        """Yield chunks of the assistant's answer to ``messages``.

        The chat template is applied by the engine; the yielded text never holds
        template tokens. The last chunk carries ``finish_reason``.
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

    def chat(
        self,
        messages: Sequence[Message],
        max_new_tokens: int = GenerationConfig.max_new_tokens,
        temperature: float = GenerationConfig.temperature,
        top_p: float = GenerationConfig.top_p,
        repetition_penalty: float = GenerationConfig.repetition_penalty,
        seed: int = GenerationConfig.seed,
    ) -> str:
        """Answer ``messages`` and return the text only. Options as in GenerationConfig."""
        config = GenerationConfig(max_new_tokens, temperature, top_p, repetition_penalty, seed)
        return self.generate(messages, config).text

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Free the engine's memory. Idempotent."""
