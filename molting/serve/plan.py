"""Which GGUF files serve which personas: the plan ``molting serve`` starts engines from.

A persona is served from one of two kinds of GGUF file (``general.type`` in its header):

- a **model** GGUF (``molting run``/``molting export`` write it: the persona's weights merged,
  its chat template carrying its system prompt): one engine loads it for that persona alone;
- an **adapter** GGUF (``molting export --adapter-only``): applied to a base GGUF
  (``--base``) that one engine loads once for every persona with an adapter on it.

Each engine is one ``llama-server`` process; personas on one engine are told apart by the
adapter scales of each request (``molting.serve.app``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from molting.errors import ConfigError
from molting.modelfiles import check_gguf
from molting.persona import Persona


@dataclass(frozen=True)
class ServedPersona:
    """One persona as the server answers for it.

    Attributes:
        id: the name clients put in a request's ``model`` (the persona's slug, "claudio").
        name: the persona's own name ("Cláudio").
        system_prompt: sent as the first message when a request has no system message.
        engine: index of the engine (``ServePlan.engines``) that answers for it.
        adapter: index of its adapter among that engine's adapters (llama-server's LoRA id);
            None for a persona served from its own model GGUF.
    """

    id: str
    name: str
    system_prompt: str
    engine: int
    adapter: int | None = None


@dataclass
class Engine:
    """One llama-server process: a model GGUF and the adapter GGUFs applied to it per request."""

    model: Path
    adapters: list[Path] = field(default_factory=list)


@dataclass
class ServePlan:
    """Personas by id, and the engines that answer for them."""

    personas: dict[str, ServedPersona]
    engines: list[Engine]


def persona_gguf(persona: Persona, runs: Path = Path("runs")) -> Path:
    """The newest GGUF under ``runs/<slug>/``: a model GGUF if there is one, else an adapter GGUF.

    Raises:
        ConfigError: no GGUF there (the message says which commands make one).
    """
    found = sorted((runs / persona.slug).glob("*.gguf"), key=lambda p: p.stat().st_mtime)
    models = [p for p in found if check_gguf(p).type != "adapter"]
    if models or found:
        return (models or found)[-1]
    raise ConfigError(
        f"{runs / persona.slug}: no GGUF for {persona.name}; make one with `molting run` or "
        "`molting export --adapter-only`, or name it with --model"
    )


def plan(personas: Sequence[Persona], files: Sequence[Path], base: Path) -> ServePlan:
    """Group ``personas`` by the model file that serves them.

    Personas named with the same model GGUF share its engine (they differ by system prompt).

    Args:
        personas: the personas, in the order ``/v1/models`` lists them.
        files: one GGUF per persona, in the same order: a model GGUF or an adapter GGUF.
        base: the base model GGUF that adapter GGUFs are applied to (loaded once).

    Raises:
        ConfigError: counts differ, or two personas share an id.
        ModelFileError: a file is missing, truncated or not a GGUF.
    """
    if len(personas) != len(files):
        raise ConfigError(f"{len(personas)} personas but {len(files)} GGUF files; give one --model per persona")
    engines: list[Engine] = []
    served: dict[str, ServedPersona] = {}
    for persona, path in zip(personas, files, strict=True):
        if persona.slug in served:
            raise ConfigError(f"{persona.root}: a persona named {persona.slug!r} is already served")
        adapter = check_gguf(path).type == "adapter"
        engine = _engine_for(engines, base if adapter else path)
        if adapter:
            engine.adapters.append(Path(path))
        lora = len(engine.adapters) - 1 if adapter else None
        served[persona.slug] = ServedPersona(
            persona.slug, persona.name, persona.system_prompt, engines.index(engine), lora
        )
    return ServePlan(served, engines)


def _engine_for(engines: list[Engine], base: Path) -> Engine:
    """The engine that loads ``base``, created (and the base checked) the first time."""
    for engine in engines:
        if engine.model == Path(base):
            return engine
    check_gguf(base)
    engines.append(Engine(Path(base)))
    return engines[-1]
