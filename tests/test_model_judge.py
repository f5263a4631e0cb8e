"""The optional model judge: a fixed prompt, a parsed score, shown beside the deterministic one."""

import pytest

from molting.eval import evaluate, load_rubric
from molting.eval.model_judge import JUDGE_PROMPT, judge_prompt, model_opinions, parse_score
from molting.persona import Persona
from tests.fakes import FakeBackend


@pytest.fixture(scope="module")
def claudio():
    return Persona.load("examples/claudio")


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("SCORE: 7 - right facts, one invented word", 7.0),
        ("Thinking... score: 3,5 - roles swapped", 3.5),
        ("I would give it a seven.", None),
        ("SCORE: 12 - excellent", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_opinions_come_beside_the_deterministic_scores(claudio):
    rubric = load_rubric(claudio)
    answers = ["O João Figueiredo é uma inteligência artificial."] * len(rubric.questions)
    result = evaluate(FakeBackend(answers), claudio, rubric, label="fine-tuned")
    before = [q.greedy.score for q in result.questions]
    judge = FakeBackend(["SCORE: 2 - roles swapped", "no score here"])
    opinions = model_opinions(judge, claudio, rubric, result)

    assert [o.score for o in opinions[:2]] == [2.0, None] and opinions[1].reply == "no score here"
    assert [q.greedy.score for q in result.questions] == before  # never replaces molting's score
    (message,) = judge.calls[0]
    assert message["role"] == "user" and "O João Figueiredo é uma inteligência artificial." in message["content"]
    assert "Question asked: Quem é o João?" in message["content"]
    # Persona-wide wrong statements are shown to the judge with each question.
    assert "João é uma IA" in judge.calls[4][0]["content"]
    assert judge.configs[0].temperature == 0 and judge.configs[0].max_new_tokens == 64


def test_the_prompt_is_fixed_and_filled_from_the_rubric(claudio):
    rubric = load_rubric(claudio)
    prompt = judge_prompt(claudio, rubric.questions[0], "Oi")
    assert prompt.startswith(JUDGE_PROMPT.split("{", 1)[0]) and "{" not in prompt
    assert "- João Figueiredo / Figueiredo" in prompt and "fluent Portuguese" in prompt


def test_molting_eval_judge_prints_both_scores_and_stores_them(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import molting.backends
    from molting.cli import app

    model = FakeBackend(["O João Figueiredo é desenvolvedor full-stack e meu parceiro de trabalho na Softtor."])
    judge = FakeBackend(["SCORE: 9 - right facts"])
    monkeypatch.setattr(molting.backends, "load_backend", lambda path, **kw: judge if path == "judge.gguf" else model)
    out = tmp_path / "eval.json"
    args = ["eval", "examples/claudio", "--model", "m.gguf", "--judge", "judge.gguf", "--out", str(out)]
    result = CliRunner().invoke(app, args, terminal_width=200)

    assert result.exit_code == 0, result.output
    assert "molting's score beside judge.gguf's" in result.output and "SCORE: 9 - right facts" in result.output
    (saved,) = json.loads(out.read_text())
    assert saved["questions"][0]["answers"][0]["score"] == 10 and saved["judge"]["model"] == "judge.gguf"
    assert [o["score"] for o in saved["judge"]["opinions"]] == [9.0] * 8


def test_molting_eval_records_the_judges_opinion_in_the_registry(tmp_path, monkeypatch):
    """The registry entry is written after the judge has spoken: its result file holds the opinions."""
    import json

    from typer.testing import CliRunner

    import molting.backends
    from molting import registry
    from molting.cli import app

    model = FakeBackend(["O João Figueiredo é desenvolvedor full-stack e meu parceiro de trabalho na Softtor."])
    judge = FakeBackend(["SCORE: 7 - fine"])
    monkeypatch.setattr(molting.backends, "load_backend", lambda path, **kw: judge if path == "judge.gguf" else model)
    args = ["eval", "examples/claudio", "--model", "m.gguf", "--judge", "judge.gguf", "--samples", "1",
            "--no-probes", "--runs", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    (entry_dir,) = registry.list_ids(tmp_path / "runs")
    entry = registry.load(entry_dir)
    saved = json.loads((entry.root / entry.results[0]["file"]).read_text(encoding="utf-8"))
    assert saved["judge"]["model"] == "judge.gguf"
    assert [o["score"] for o in saved["judge"]["opinions"]] == [7.0] * 8
    assert entry.result().label == "GGUF m"  # the file still reads back as a RubricResult
