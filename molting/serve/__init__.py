"""``molting serve``: personas behind an OpenAI-compatible endpoint.

The engine is llama.cpp's ``llama-server`` (one process per model GGUF: a persona's merged
GGUF, or a base GGUF with every persona's adapter GGUF loaded once); a small Starlette app
in front maps a request's ``model`` to its persona (``molting.serve.app``). For more users
than one machine holds, ``molting serve --engine vllm --print`` writes the vLLM command
for the same personas (``molting.serve.vllm``). See docs/serving.md.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from molting.models import EMBEDDED, embedded_gguf
from molting.persona import Persona
from molting.serve.llama_server import EngineOptions, LlamaServer, command, find_llama_server
from molting.serve.plan import Engine, ServedPersona, ServePlan, persona_gguf, plan

__all__ = [
    "Engine",
    "EngineOptions",
    "LlamaServer",
    "ServePlan",
    "ServedPersona",
    "command",
    "find_llama_server",
    "load_plan",
    "persona_gguf",
    "plan",
    "run_server",
]


def load_plan(
    persona_dirs: Sequence[str | Path],
    models: Sequence[str | Path] = (),
    base: str | Path = "smollm2-135m",
    runs: str | Path = "runs",
) -> ServePlan:
    """Load the personas and plan their engines (``molting serve``'s arguments).

    Args:
        persona_dirs: persona directories, in the order ``/v1/models`` lists them.
        models: one GGUF per persona (a model GGUF, or an adapter GGUF for ``base``); empty:
            each persona's newest GGUF under ``runs/<slug>/`` (``persona_gguf``).
        base: the base GGUF that adapter GGUFs apply to: a file or an embedded model name.
        runs: where ``molting run`` wrote its run directories.

    Raises:
        PersonaError, DatasetError: a persona directory is invalid.
        ConfigError, ModelFileError: see ``plan`` and ``persona_gguf``.
    """
    personas = [Persona.load(d) for d in persona_dirs]
    files = [Path(m) for m in models] or [persona_gguf(p, Path(runs)) for p in personas]
    base_file = embedded_gguf(str(base)) if str(base) in EMBEDDED else Path(base)
    return plan(personas, files, base_file)


def run_server(
    served: ServePlan,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: EngineOptions = EngineOptions(),  # noqa: B008 (frozen dataclass)
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Start an engine per ``served.engines``, then answer on ``host:port`` until SIGINT/SIGTERM.

    Args:
        served: the plan (``molting.serve.plan.plan``).
        host, port: where the OpenAI-compatible API listens (``/v1/...``, ``/health``).
        options: llama-server's settings.
        on_ready: called with the API's base URL once every engine answers ``/health``,
            just before the API binds its port.

    Raises:
        ConfigError: no llama-server binary, or an engine failed to start (its log's end).
    """
    import uvicorn

    from molting.serve.app import create_app

    with tempfile.TemporaryDirectory(prefix="molting-serve-") as logs, contextlib.ExitStack() as engines:
        servers = [
            engines.enter_context(LlamaServer(engine, options, Path(logs) / f"engine-{i}.log"))
            for i, engine in enumerate(served.engines)
        ]
        server = uvicorn.Server(
            uvicorn.Config(create_app(served, [s.url for s in servers]), host=host, port=port, log_level="warning")
        )
        if on_ready is not None:
            on_ready(f"http://{host}:{port}/v1")
        server.run()
