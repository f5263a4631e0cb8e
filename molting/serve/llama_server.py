"""llama.cpp's ``llama-server`` as a child process on a loopback port.

``make install`` builds ``llama-server`` from the llama.cpp source that the llama-cpp-python
sdist ships (``scripts/build-llama-tools.sh``) into ``.venv/llama.cpp/bin/``. The flags
used here are llama-server's own (``llama-server --help``; ``tools/server/README.md``):

- ``--lora FILE`` (repeated) with ``--lora-init-without-apply``: every adapter loaded at
  scale 0; a request picks its scales with ``"lora": [{"id": i, "scale": s}, ...]``
  (an adapter it does not list runs at scale 0);
- ``--jinja``: the GGUF's own chat template;
- ``-np N``: N requests decoded together (continuous batching), in one KV cache of
  ``-c`` tokens shared by all of them (``--kv-unified``), so each may use the whole context.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from molting.errors import ConfigError
from molting.serve.plan import Engine

ENV_VAR = "MOLTING_LLAMA_SERVER"


def find_llama_server() -> Path:
    """The ``llama-server`` binary: ``$MOLTING_LLAMA_SERVER``, the venv's build, else ``PATH``.

    Raises:
        ConfigError: none found (the message says how to build one).
    """
    candidates = [os.environ.get(ENV_VAR), Path(sys.prefix) / "llama.cpp" / "bin" / "llama-server"]
    candidates.append(shutil.which("llama-server"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ConfigError(
        f"llama-server not found (looked at ${ENV_VAR}, {candidates[1]} and PATH); `make install` builds it "
        "from the llama-cpp-python sdist (scripts/build-llama-tools.sh llama-server)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class EngineOptions:
    """llama-server's settings for every engine.

    Attributes:
        n_ctx: context window in tokens, shared by the ``parallel`` requests in flight
            (``-c``); a request longer than it is refused with llama-server's 400.
        parallel: requests decoded together (``-np``).
        n_threads: CPU threads (``-t``); None lets llama-server choose.
        n_gpu_layers: blocks offloaded to a GPU (``-ngl``); 0 = CPU only, -1 = all.
        flash_attn: flash attention (``-fa on|off``); on by default, as ``LlamaCppBackend``'s,
            so that the server and the backend compute the same greedy text (``auto``, the
            server's own default, may choose otherwise on some devices).
        startup_timeout: seconds to wait for ``/health`` after the start.
    """

    n_ctx: int = 2048
    parallel: int = 4
    n_threads: int | None = None
    n_gpu_layers: int = 0
    flash_attn: bool = True
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.n_ctx < 16 or self.parallel < 1:
            raise ConfigError(f"n_ctx {self.n_ctx} (at least 16) or parallel {self.parallel} (at least 1) out of range")


def command(binary: Path, engine: Engine, port: int, options: EngineOptions) -> list[str]:
    """The llama-server command line for ``engine`` on 127.0.0.1:``port``."""
    args = [str(binary), "-m", str(engine.model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["-c", str(options.n_ctx), "-np", str(options.parallel), "--kv-unified", "--jinja", "--no-webui"]
    args += ["-ngl", str(options.n_gpu_layers), "-fa", "on" if options.flash_attn else "off"]
    if options.n_threads:
        args += ["-t", str(options.n_threads)]
    for adapter in engine.adapters:
        args += ["--lora", str(adapter)]
    if engine.adapters:
        # --cache-ram 0: llama-server's RAM prompt cache restores a cached prompt's KV cells by its tokens alone,
        # whichever adapter computed them, into a slot that already runs the request's adapter: a prompt one
        # persona's adapter read would answer another persona's request (measured: docs/serving.md).
        args += ["--lora-init-without-apply", "--cache-ram", "0"]
    return args


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, SIGTERM it when its parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaServer:
    """A running llama-server; ``stop()`` ends it (also on ``with`` exit).

    Args:
        engine: the model and adapters to load.
        options: see EngineOptions.
        log: file that receives llama-server's output (its own log lines).

    Raises:
        ConfigError: no binary, or llama-server exited or did not answer ``/health``
            within ``startup_timeout`` (the message holds the end of its log).
    """

    def __init__(self, engine: Engine, options: EngineOptions, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = command(find_llama_server(), engine, self.port, options)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        try:
            self._wait_ready(options.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"llama-server exited with code {self.process.returncode}: {self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise ConfigError(f"llama-server did not answer /health within {timeout:g} s: {self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
