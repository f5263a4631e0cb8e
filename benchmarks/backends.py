"""transformers vs llama.cpp vs raw llama.cpp on the embedded SmolLM2: a thin caller of ``molting bench``.

The measuring lives in the package (``molting.bench``); this script only gives
``molting bench`` this directory's report path as default. Every option of
``molting bench --help`` passes through::

    python benchmarks/backends.py                                   # smollm2-135m, every engine, Q4_K_M
    python benchmarks/backends.py --model tinyllama-1.1b --engine llama.cpp --engine "llama.cpp raw"
    python benchmarks/backends.py --threads 2 --no-repack --repeats 5

Writes ``benchmarks/reports/backends.{md,json,png}`` unless ``--out`` is given.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "reports" / "backends"


def main(argv: list[str] | None = None) -> None:
    from molting.cli import app

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv += ["--out", str(DEFAULT_OUT)]
    app(["bench", *argv], standalone_mode=False)


if __name__ == "__main__":
    if importlib.util.find_spec("molting") is None:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
    main()
