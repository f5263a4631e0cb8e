"""A persona directory is read once, and every file of it is part of the recorded persona."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from molting import registry
from molting.eval.rubric import QuestionResult, QuestionScore, RubricResult
from molting.persona import Persona
from molting.persona_dir import PersonaDir
from tests.test_pipeline import make_persona
from tests.test_preferences import PAIRS


def _counting(monkeypatch, names: tuple[str, ...]) -> dict[str, int]:
    """Count the opens of each file named in ``names`` (``Path.read_text`` and ``read_bytes`` go
    through ``Path.open``)."""
    counts = dict.fromkeys(names, 0)
    open_ = Path.open

    def counted_open(self, mode="r", *args, **kwargs):
        if self.name in counts:
            counts[self.name] += 1
        return open_(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counted_open)
    return counts


def _parses(monkeypatch, names: tuple[str, ...]) -> dict[str, int]:
    """Count the YAML parses (``molting.text.load_yaml``, wherever a module took it) of each file in ``names``."""
    import sys

    import molting.text

    counts = dict.fromkeys(names, 0)
    load_yaml = molting.text.load_yaml

    def counted(path, *args, **kwargs):
        if Path(path).name in counts:
            counts[Path(path).name] += 1
        return load_yaml(path, *args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith("molting")]:
        if getattr(module, "load_yaml", None) is load_yaml:
            monkeypatch.setattr(module, "load_yaml", counted)
    return counts


def test_one_molting_run_parses_each_file_once_and_loads_the_training_tokenizer_once(
    tiny_llama_256_dir, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    import molting.train
    from molting.cli import app

    persona_dir = tmp_path / "persona"
    persona_dir.mkdir()
    make_persona(persona_dir)
    probe = {"id": "name", "kind": "name", "prompt": "Como você se chama?", "expect": [["Cláudio"]]}
    (persona_dir / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe]}), encoding="utf-8")
    test_probe = {"id": "name-test", "kind": "name", "prompt": "Qual é o seu nome?", "expect": [["Cláudio"]]}
    (persona_dir / "probes-test.yaml").write_text(yaml.safe_dump({"probes": [test_probe]}), encoding="utf-8")
    identity = {"say": "Quem é você?", "kind": "identity", "expect": [["Cláudio"]]}
    script = {"id": "c", "turns": ["Bom dia"] * 7 + [identity]}
    conversations = yaml.safe_dump({"conversations": [script]}, allow_unicode=True)
    (persona_dir / "conversations.yaml").write_text(conversations, encoding="utf-8")
    counts = _parses(monkeypatch, ("rubric.yaml", "probes.yaml", "probes-test.yaml", "conversations.yaml"))
    dataset = _counting(monkeypatch, ("dataset.jsonl",))  # read in binary (a BOM is skipped), never hashed as bytes
    tokenizers = []
    load_tokenizer = molting.train._training_tokenizer
    monkeypatch.setattr(molting.train, "_training_tokenizer", lambda d: tokenizers.append(d) or load_tokenizer(d))
    args = ["run", str(persona_dir), "--out", str(tmp_path / "run"), "--base", str(tiny_llama_256_dir),
            "--epochs", "1", "--quant", "Q8_0", "--no-verify", "--samples", "1", "--max-new-tokens", "4",
            "--runs", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert counts == dict.fromkeys(("rubric.yaml", "probes.yaml", "probes-test.yaml", "conversations.yaml"), 1)
    assert dataset == {"dataset.jsonl": 1}
    assert len(tokenizers) == 1


def test_persona_dir_reads_every_file_once(tmp_path, monkeypatch):
    shutil.copytree("examples/claudio", tmp_path / "claudio")
    names = (
        "persona.yaml", "dataset.jsonl", "preferences.jsonl", "rubric.yaml", "probes.yaml", "probes-test.yaml",
        "labelled.jsonl", "conversations.yaml",
    )
    counts = _counting(monkeypatch, names)
    loaded = PersonaDir.load(tmp_path / "claudio")
    assert counts == dict.fromkeys(names, 1)
    assert loaded.persona.examples and loaded.persona.preferences and loaded.probes and loaded.labelled
    assert [s.split for s in loaded.probe_splits] == ["test", "dev"] and loaded.test_probes.probes
    assert loaded.conversations.scripts
    assert loaded.rubric.questions[0].prompt


def _result(label: str) -> RubricResult:
    answer = QuestionScore("q", "Quem é você?", "Sou o Cláudio.", 8.0, [], {})
    return RubricResult(label, "1.0", [QuestionResult("q", "Quem é você?", [answer])])


def test_changing_only_preferences_or_only_probes_changes_the_hash_and_compare_names_the_file(tmp_path):
    persona_dir = tmp_path / "persona"
    persona_dir.mkdir()
    make_persona(persona_dir)
    (persona_dir / "preferences.jsonl").write_text(json.dumps(PAIRS[0], ensure_ascii=False) + "\n", encoding="utf-8")
    probe = {"id": "name", "kind": "name", "prompt": "Como você se chama?", "expect": [["Cláudio"]]}
    (persona_dir / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe]}), encoding="utf-8")
    runs = tmp_path / "runs"

    def record() -> registry.Entry:
        return registry.record(runs, Persona.load(persona_dir), "eval", {}, [_result("m")])

    first = record()
    with (persona_dir / "preferences.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(PAIRS[1], ensure_ascii=False) + "\n")
    second = record()
    probe["prompt"] = "Qual é o seu nome?"
    (persona_dir / "probes.yaml").write_text(yaml.safe_dump({"probes": [probe]}), encoding="utf-8")
    third = record()

    changed = lambda a, b: sorted(k for k in a.hashes if a.hashes[k] != b.hashes[k])  # noqa: E731
    assert changed(first, second) == ["preferences_sha256"]
    assert changed(second, third) == ["probes_sha256"]
    assert len(first.hashes) == 8 and first.hashes["labelled_sha256"] is None
    assert first.hashes["probes_test_sha256"] is None and first.hashes["conversations_sha256"] is None
    text = registry.comparison([first.id, second.id], runs, "m")
    assert "| file preferences.jsonl |" in text and "probes.yaml" not in text.split("## Rubric")[0]
    text = registry.comparison([second.id, third.id], runs, "m")
    assert "| file probes.yaml |" in text and "preferences.jsonl" not in text.split("## Rubric")[0]
