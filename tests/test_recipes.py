"""The recipe search (experiments/recipes.py) chooses by the dev probes only (issue 25)."""

import importlib.util
import json
from pathlib import Path

import pytest

from molting.errors import DatasetError
from molting.eval.probes import load_probe_splits, load_probes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def recipes(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("recipes", ROOT / "experiments" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)  # work files and rows go here, not into experiments/
    return module


def test_a_recipe_persona_holds_the_dev_probes_and_not_the_test_probes(recipes, tmp_path):
    name = "phrasings-full"
    persona = recipes.make_persona(name, recipes.RECIPES[name][1], tmp_path / name)
    assert [s.split for s in load_probe_splits(persona)] == ["dev"]
    assert load_probes(persona, "test") is None
    assert len(load_probes(persona).probes) == len(load_probes(ROOT / "examples" / "claudio").probes)
    # Control: the persona it copies has both.
    assert [s.split for s in load_probe_splits(ROOT / "examples" / "claudio")] == ["test", "dev"]


def test_a_recipe_run_asks_dev_only(recipes, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(persona, config, ui):
        seen["splits"], seen["test"] = config.probe_splits, load_probes(persona, "test")
        raise Stop

    monkeypatch.setattr(recipes, "run", fake_run)
    with pytest.raises(Stop):
        recipes.run_recipe("phrasings-full", "Q8_0")
    assert seen == {"splits": ("dev",), "test": None}


def test_a_recipe_whose_data_holds_a_test_prompt_is_refused(recipes, monkeypatch, tmp_path):
    test_prompt = load_probes(ROOT / "examples" / "claudio", "test").probes[0].prompt
    leaky = tmp_path / "leaky.jsonl"
    row = {"messages": [{"role": "user", "content": test_prompt}, {"role": "assistant", "content": "Cláudio."}]}
    leaky.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    monkeypatch.setattr(recipes, "V4_FILE", leaky)
    with pytest.raises(DatasetError, match="held-out probe"):
        recipes.make_persona("phrasings-full", recipes.RECIPES["phrasings-full"][1], tmp_path / "x")


def test_a_test_rate_is_reported_once(recipes, tmp_path):
    (tmp_path / "test-rates.jsonl").write_text(json.dumps({"recipe": "extra-full"}) + "\n")
    recipes.TEST_ROWS = tmp_path / "test-rates.jsonl"
    with pytest.raises(SystemExit, match="extra-full has its test rate already"):
        recipes.test_rate("extra-full", "Q8_0")
