"""llama.cpp builds against each other: llama-bench of each build on the same GGUFs, rounds alternating.

    python benchmarks/llama_cpp_builds.py --build default=.venv/llama.cpp/bin/llama-bench \\
        --build avx2=/tmp/v-avx2/llama.cpp/bin/llama-bench --gguf model.Q8_0.gguf --threads 2 --rounds 2

Each round runs every build once (``-r 1``) on every GGUF: pp and tg at depths 0 and
``--n-prompt`` (``molting.bench.llamabench``), so a shared machine's load drifts alike over the
builds. Prints JSON (every round) and writes a markdown table: the median tok/s per build and
test, and each build's ratio to the first ``--build``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from molting.bench import llamabench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=path/to/llama-bench (first: reference)")
    parser.add_argument("--gguf", action="append", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-flash-attn", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports/llama-cpp-builds.md"))
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.build)
    settings = llamabench.Settings(
        args.n_prompt, args.n_new, args.threads, flash_attn=not args.no_flash_attn, repeats=1
    )
    rounds = {(g.name, b): [] for g in args.gguf for b in builds}
    for _ in range(args.rounds):
        for gguf in args.gguf:
            for name, binary in builds.items():
                results, _facts = llamabench.run(Path(binary), gguf, settings)
                rounds[gguf.name, name].append(results)
    print(json.dumps({f"{g} | {b}": [[vars(r) for r in rs] for rs in v] for (g, b), v in rounds.items()}))
    args.out.write_text(table(rounds, builds, settings), encoding="utf-8")


def table(rounds: dict, builds: dict, settings: llamabench.Settings) -> str:
    """Markdown: per GGUF and build, median tok/s of each test and the ratio to the first build."""
    n, g = settings.n_prompt, settings.n_new
    tests = [("pp", n, 0), ("tg", g, 0), ("pp", n, n), ("tg", g, n)]
    header = ["GGUF", "build", *(f"{t}{k} @ d{d}" for t, k, d in tests)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(tests)]
    reference = next(iter(builds))
    for (gguf, build), runs in rounds.items():
        medians = [_median(runs, t) for t in tests]
        base = [_median(rounds[gguf, reference], t) for t in tests]
        pairs = zip(medians, base, strict=True)
        cells = [f"{m:.1f}" + ("" if build == reference else f" ({m / b:.2f}×)") for m, b in pairs]
        lines.append("| " + " | ".join([gguf, build, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _median(runs: list, test: tuple) -> float:
    return statistics.median(r.tok_s for results in runs if (r := llamabench.find(results, *test)))


if __name__ == "__main__":
    main()
