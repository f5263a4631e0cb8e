"""Runs molting's CLI once per case, each in its own process, for ``test_hostile.py``.

``python tests/hostile_runner.py CASES.json RESULTS.json``: CASES is a list of
``{"argv": [...], "cwd": DIR}``. The libraries a command imports lazily are imported once
here; then every case is a ``fork`` of this warm process, so it pays no import time and still
has its own exit code, its own stdout and stderr (files under its ``cwd``' parent) and its own
crash. RESULTS gets ``{"code", "stdout", "stderr"}`` per case, in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def warm_up() -> None:
    """Import what the commands import lazily, so that forked cases start at once."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import molting.backends.llamacpp  # noqa: F401
    import molting.backends.transformers  # noqa: F401
    import molting.cli  # noqa: F401
    import molting.data  # noqa: F401
    import molting.eval.probes  # noqa: F401
    import molting.export.merge  # noqa: F401
    import molting.persona  # noqa: F401
    import molting.pipeline  # noqa: F401


def run_case(argv: list[str], cwd: str, out: Path, err: Path) -> int:
    """Fork; the child runs ``molting ARGV`` in ``cwd`` with stdout/stderr in ``out``/``err``; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.chdir(cwd)
            for fd, path in ((1, out), (2, err)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            from molting.cli import main

            sys.argv = ["molting", *argv]
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # a crash the CLI let through: the test sees the traceback
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(cases_path: str, results_path: str) -> None:
    cases = json.loads(Path(cases_path).read_text(encoding="utf-8"))
    warm_up()
    results = []
    for i, case in enumerate(cases):
        out, err = Path(cases_path).with_name(f"case{i}.out"), Path(cases_path).with_name(f"case{i}.err")
        code = run_case(case["argv"], case["cwd"], out, err)
        results.append(
            {"code": code, "stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}
        )
    Path(results_path).write_text(json.dumps(results), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:3])
