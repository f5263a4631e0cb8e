"""Test doubles: a Backend that answers from a list, so rubric and persona code run without a model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from molting.backends.base import Backend, Chunk, GenerationConfig, Message


class FakeBackend(Backend):
    """Answers with ``answers[i]`` on the i-th call, word by word, and records the prompts and decoding options.

    An answer longer than ``config.max_new_tokens`` words is cut there with
    ``finish_reason="length"``, as a real engine would.
    """

    name = "fake"

    def __init__(self, answers: Sequence[str]):
        self.answers = list(answers)
        self.calls: list[list[Message]] = []
        self.configs: list[GenerationConfig] = []

    def stream(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[Chunk]:
        answer = self.answers[len(self.calls) % len(self.answers)]
        self.calls.append(list(messages))
        self.configs.append(config)
        words = answer.split(" ")
        kept = words[: config.max_new_tokens]
        for i, word in enumerate(kept, start=1):
            last = i == len(kept)
            reason = ("length" if len(words) > len(kept) else "stop") if last else None
            yield Chunk(
                word + ("" if last else " "), prompt_tokens=len(messages), generated_tokens=i, finish_reason=reason
            )
