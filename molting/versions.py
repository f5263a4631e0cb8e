"""The versions a record names: Python and the packages that decide what a run computes."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("molting", "torch", "transformers", "peft", "trl", "bitsandbytes", "llama-cpp-python", "gguf")


def package_versions() -> dict:
    """Python and the installed versions of PACKAGES (None for a package not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
