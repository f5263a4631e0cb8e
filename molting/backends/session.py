"""A conversation held over any backend: the history kept, and fitted to the context window.

``Persona.session(model)`` opens one with the persona's system prompt; ``molting chat PERSONA``
(no message) is one in the terminal. Each :meth:`ChatSession.send` (or :meth:`ChatSession.stream`)
sends the system prompt, the history and the new message, and keeps the answer in the history.

The context policy (:func:`fit_to_context`): a prompt is sent only if its tokens, counted with
the model's own tokenizer and chat template (:meth:`Backend.count_tokens`), plus the answer's
``max_new_tokens`` fit in ``n_ctx``. When they do not, the oldest exchange (one user turn and
the assistant's answer to it) is dropped from the history, then the next oldest, until they fit.
The system prompt and the new message are always kept; if those two alone do not fit, the
call fails with a ConfigError rather than cutting either. Dropped turns are gone from the
session's history (``ChatSession.dropped`` counts them): the model never sees them again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from molting.backends.base import Backend, Chunk, GenerationConfig, Message
from molting.errors import ConfigError


def fit_to_context(
    backend: Backend,
    system: Sequence[Message],
    history: Sequence[Message],
    message: Message,
    max_new_tokens: int,
    n_ctx: int | None,
) -> int:
    """How many of ``history``'s oldest messages to drop so that the prompt and its answer fit.

    Args:
        backend: counts the prompt's tokens (chat template included) with the model's tokenizer.
        system: the system message, or nothing.
        history: earlier turns, user and assistant alternating, oldest first.
        message: the new user turn.
        max_new_tokens: tokens reserved for the answer.
        n_ctx: the context window in tokens; None: no limit (nothing is dropped).

    Returns:
        An even number of messages (whole exchanges) to drop from the front of ``history``.

    Raises:
        ConfigError: the system prompt and ``message`` alone, with ``max_new_tokens``, exceed ``n_ctx``.
    """
    if n_ctx is None:
        return 0
    drop = 0
    while True:
        prompt = [*system, *history[drop:], message]
        tokens = backend.count_tokens(prompt)
        if tokens + max_new_tokens <= n_ctx:
            return drop
        if drop >= len(history):
            raise ConfigError(
                f"the system prompt and the message take {tokens} tokens; with max_new_tokens "
                f"({max_new_tokens}) that exceeds the context window n_ctx ({n_ctx})"
            )
        drop += 2 if history[drop]["role"] == "user" and drop + 1 < len(history) else 1


@dataclass
class ChatSession:
    """A multi-turn conversation with ``backend``; see the module docstring for the context policy.

    Attributes:
        backend: any Backend; one that cannot count tokens (``count_tokens`` raises
            NotImplementedError) is held to no context limit.
        system_prompt: the system message's text; None sends none (a molting GGUF's chat
            template carries the persona's own).
        config: decoding of every answer; its ``max_new_tokens`` is reserved in the window.
        n_ctx: the context window in tokens; default the backend's (``Backend.n_ctx``).
        history: the turns the model sees, user and assistant alternating, oldest first.
        dropped: messages dropped from the front of the history so far (two per exchange).
    """

    backend: Backend
    system_prompt: str | None = None
    config: GenerationConfig = field(default_factory=GenerationConfig)
    n_ctx: int | None = None
    history: list[Message] = field(default_factory=list)
    dropped: int = 0

    def __post_init__(self) -> None:
        if self.n_ctx is None:
            self.n_ctx = self.backend.n_ctx

    def messages(self, text: str) -> list[Message]:
        """The prompt for the next user turn ``text``, the history fitted to the window first.

        Raises:
            ConfigError: the system prompt and ``text`` alone do not fit (see ``fit_to_context``).
        """
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        message = {"role": "user", "content": text}
        try:
            drop = fit_to_context(self.backend, system, self.history, message, self.config.max_new_tokens, self.n_ctx)
        except NotImplementedError:
            drop = 0
        if drop:
            del self.history[:drop]
            self.dropped += drop
        return [*system, *self.history, message]

    def stream(self, text: str) -> Iterator[Chunk]:
        """Yield the answer to ``text`` as it is decoded; when it ends, both turns join the history."""
        prompt = self.messages(text)
        parts = []
        for chunk in self.backend.stream(prompt, self.config):
            parts.append(chunk.text)
            yield chunk
        self.history += [prompt[-1], {"role": "assistant", "content": "".join(parts).strip()}]

    def send(self, text: str) -> str:
        """The answer to ``text`` (whole), kept in the history."""
        return "".join(chunk.text for chunk in self.stream(text)).strip()

    def reset(self) -> None:
        """Forget the history: the next turn starts a new conversation."""
        self.history.clear()
        self.dropped = 0
