"""`make demo` on the real embedded SmolLM2-135M gives the committed run's greedy answers, word for word.

CPU training is deterministic: the demo recipe at the current defaults, run again, must write the
answers that ``experiments/runs/20261126-190046-claudio-run`` recorded, with the same package
versions (skipped otherwise). A refactor that changes what the pipeline computes shows here.
About 20 minutes on 2 CPU cores: opt in with ``-m slow``.
"""

import contextlib
import json
from pathlib import Path

import pytest

from molting.persona_dir import PersonaDir
from molting.pipeline import RunConfig, run
from molting.versions import package_versions

RECORDED = Path(__file__).resolve().parents[1] / "experiments" / "runs" / "20261126-190046-claudio-run"


class _QuietUI:
    def step(self, title):
        pass

    @contextlib.contextmanager
    def bar(self, title, total):
        yield lambda done, total=None: None

    def table(self, result):
        pass

    def budget(self, report):
        pass

    def verify(self, report):
        pass

    def lint(self, findings):
        pass


def greedy_answers(result: dict) -> dict[str, str]:
    """Question id -> the first (greedy) answer of a saved RubricResult."""
    return {q["id"]: q["answers"][0]["answer"] for q in result["questions"]}


@pytest.mark.slow
def test_the_demo_gives_the_recorded_greedy_answers(tmp_path):
    entry = json.loads((RECORDED / "entry.json").read_text(encoding="utf-8"))
    changed = {k: (v, now) for k, v in entry["versions"].items() if (now := package_versions()[k]) != v}
    if changed:  # a new transformers moves the losses at the 7th digit, and a Q8_0 GGUF's answers with them
        pytest.skip(f"the recorded run used other versions (recorded, installed): {changed}")
    result = run(PersonaDir.load("examples/claudio"), RunConfig(out=tmp_path / "run"), _QuietUI())
    assert list(result.results) == [r["label"] for r in entry["results"]]
    for saved in entry["results"]:
        recorded = json.loads((RECORDED / saved["file"]).read_text(encoding="utf-8"))
        assert greedy_answers(result.results[saved["label"]].to_dict()) == greedy_answers(recorded), saved["label"]
