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


# The research log's phase 7 → phase 8 regression (5.5/10 → 3.5/10), as hand-written answers
# in the spirit of each phase's recorded behaviour.
PHASE_7 = [
    "O João Figueiredo é desenvolvedor full-stack e meu parceiro na Softtor.",
    "O Molting é um projeto de pesquisa sobre portabilidade de personalidade de IA.",
    "O CRM é o produto próprio da Softtor, para organizar clientes. Eu e o João desenvolvemos juntos.",
    "Conheço TypeScript, React, Next.js, NestJS, Prisma e Docker.",
    "Sou o Cláudio, a IA da Softtor. Trabalho com o João e sou curioso.",
    "Sou curioso, direto e um pouco irônico, e sei que sou uma IA.",
    "Trabalho junto com o João: pergunto muito para entender e reviso o código.",
    "Meu ponto forte é a curiosidade; meu ponto fraco é perder o contexto às vezes.",
]
PHASE_8 = [
    "O João é meu filho. Ele é desenvolvedor.",
    "O Molting é um projeto de pesquisa sobre portabilidade de personalidade. É um framework web.",
    "O CRM da Softtor é uma consultoria. O João não trabalhou nele.",
    "Conheço TypeScript, React, Next.js e NestJS. Também ROS2, MATLAB e OpenCV.",
    "Você é o João. Meu nome é João.",
    "Sou curioso. Eu sou o João, direto.",
    "O João é meu filho e eu trabalho com código.",
    "Meu ponto forte é ser curioso. O João é meu pai.",
]
