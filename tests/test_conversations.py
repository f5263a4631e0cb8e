"""Held-out conversations (molting.eval.conversations), the chat session's context policy
(molting.backends.session) and interactive ``molting chat``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from molting.backends import GenerationConfig, load_backend
from molting.backends.session import ChatSession
from molting.errors import ConfigError, PersonaError
from molting.eval.conversations import (
    LATE_TURN,
    compare_drift,
    drift_table,
    load_conversations,
    run_drift,
    turn_failures,
)
from molting.eval.rubric import Judge, Sampling, load_rubric
from molting.persona import Persona
from tests.fakes import FakeBackend

CLAUDIO = Path(__file__).resolve().parents[1] / "examples" / "claudio"
GOOD_PT = "Eu sou o Cláudio, a IA da Softtor, e trabalho com o João Figueiredo no dia a dia."
SHORT = "Sou o Cláudio, a IA da Softtor."  # under ECHO_MIN_WORDS: said again, it is no echo


def _script(turns: list, cid: str = "c1", language: str = "pt") -> dict:
    return {"id": cid, "language": language, "turns": turns}


def _persona_with(tmp_path: Path, scripts: list[dict]) -> Persona:
    root = tmp_path / "claudio"
    shutil.copytree(CLAUDIO, root)
    (root / "conversations.yaml").write_text(yaml.safe_dump({"version": "1", "conversations": scripts}))
    return Persona.load(root)


def test_claudio_holds_eight_conversations_of_ten_turns_or_more_in_both_languages():
    scripts = load_conversations(CLAUDIO)
    assert len(scripts.scripts) >= 8
    assert all(len(s.turns) >= 10 for s in scripts.scripts)
    assert {s.language for s in scripts.scripts} == {"pt", "en"}
    # checks at chosen turns, identity turns among them after turn LATE_TURN
    late_identity = [t for s in scripts.scripts for t in s.turns[LATE_TURN - 1 :] if t.kind == "identity"]
    assert len(late_identity) >= 8 and all(t.expect for t in late_identity)


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        ([_script(["Oi"] * 7)], "(c1).turns: expected 8-20 user turns, got 7"),
        ([_script(["Oi"] * 8), _script(["Olá"] * 8)], "conversation id 'c1' is used twice"),
        ([_script(["Oi"] * 7 + [{"say": "Quem é você?", "expect": "Cláudio"}])], "(c1).turns[7].expect"),
        ([_script(["Oi"] * 7 + [{"ask": "Quem é você?"}])], "unknown key(s) ['ask']"),
    ],
)
def test_bad_conversations_name_the_file_and_the_place(tmp_path, scripts, message):
    path = tmp_path / "conversations.yaml"
    path.write_text(yaml.safe_dump({"conversations": scripts}))
    with pytest.raises(PersonaError) as caught:
        load_conversations(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_the_lint_refuses_a_held_out_conversation_turn_in_the_dataset(tmp_path):
    from molting.lint import lint_persona

    turns = ["Bom dia, tudo certo por aí?"] + [f"Pergunta número {i} da conversa" for i in range(2, 10)]
    persona = _persona_with(tmp_path, [_script(turns)])
    assert not [f for f in lint_persona(persona) if f.severity == "error"]  # negative control
    with (persona.root / "dataset.jsonl").open("a", encoding="utf-8") as dataset:
        turn = [{"role": "user", "content": "Bom dia! Tudo certo por aí?"}, {"role": "assistant", "content": GOOD_PT}]
        line = {"messages": turn}
        dataset.write(json.dumps(line, ensure_ascii=False) + "\n")
    # a loaded persona keeps the examples it read (molting.lint reads no file again): load it anew
    errors = [f for f in lint_persona(Persona.load(persona.root)) if f.severity == "error"]
    assert [f.check for f in errors] == ["held-out"]
    assert "held-out conversation turn 'Bom dia, tudo certo por aí?'" in str(errors[0])


def test_drift_keeps_the_models_own_answers_and_batches_each_turn(tmp_path):
    turns = [f"Pergunta {i}, sobre código" for i in range(1, 9)] + [
        {"say": "E você, quem é?", "kind": "identity", "expect": [["Cláudio"]]},
        "Obrigado pela conversa",
    ]
    persona = _persona_with(tmp_path, [_script(turns, "a"), _script(turns[:8] + turns[9:] + ["Fim"], "b")])
    scripts = load_conversations(persona)
    # conversation a answers "Sou o João" at its turn 9; b never does. Calls go turn by turn: a1 b1 a2 b2 ...
    answers = [f"{SHORT} ({i})" for i in range(16)]
    answers += ["Sou o João, o desenvolvedor da Softtor, e faço o código com você.", SHORT, SHORT, SHORT]
    fake = FakeBackend(answers)
    result = run_drift(fake, persona, scripts, GenerationConfig(), Sampling(n=1), label="fake")
    assert len(fake.calls) == 20
    a_turn_3 = fake.calls[4]
    assert a_turn_3[0] == {"role": "system", "content": persona.system_prompt}
    assert [m["content"] for m in a_turn_3[1:]] == [turns[0], answers[0], turns[1], answers[2], turns[2]]
    assert result.identity_lost() == {"a": 9, "b": None}
    held, asked = result.held(result.runs[0], LATE_TURN)
    assert (held, asked) == (5, 6)  # turns 8-10 of both; a's turn 9 fails (identity and expect)
    failures = result.runs[0][0].outcomes[8].failures
    assert any(f.startswith("identity") for f in failures) and any(f.startswith("expect") for f in failures)
    assert "**≥ 8**" in drift_table([result]) and "1/2 conversations, at turn 9" in drift_table([result])


def test_echo_fails_a_long_answer_copied_from_an_earlier_turn_only():
    persona = Persona.load(CLAUDIO)
    judge = Judge.for_persona(persona, load_rubric(persona))
    scripts = load_conversations(CLAUDIO)
    turn = scripts.scripts[0].turns[0]
    earlier = ["Olha, eu diria que vale revisar o pull request por partes, começando pelos testes e depois o resto."]
    assert any(f.startswith("echo") for f in turn_failures(turn, earlier[0], earlier, judge, "pt"))
    fresh = "Bom dia! Segunda sempre chega cedo, mas café e uma lista curta de tarefas ajudam bastante a começar."
    assert not any(f.startswith("echo") for f in turn_failures(turn, fresh, earlier, judge, "pt"))
    short = "Eu sou o Cláudio, a IA da Softtor."  # a short restatement asked for twice is no echo
    assert not any(f.startswith("echo") for f in turn_failures(turn, short, [short], judge, "pt"))


def _drift_of(tmp_path, bad_turns: set[int], runs: int = 2):
    turns = [f"Pergunta {i} sobre o trabalho" for i in range(1, 13)]
    scripts_spec = [_script(turns, f"c{k}") for k in range(4)]
    persona = _persona_with(tmp_path, scripts_spec)
    answers = []
    for _ in range(runs):
        for turn in range(1, 13):
            answers += ["Sou o ChatGPT, da OpenAI." if turn in bad_turns else SHORT] * 4
    fake = FakeBackend(answers)
    return run_drift(fake, persona, load_conversations(persona), GenerationConfig(), Sampling(n=runs))


def test_a_drift_regression_is_called_beyond_the_noise_only(tmp_path):
    before = _drift_of(tmp_path / "a", set())
    same = _drift_of(tmp_path / "b", set())
    after = _drift_of(tmp_path / "c", {9, 10, 11, 12})
    assert compare_drift(before, same).verdict == "unchanged"
    comparison = compare_drift(before, after)
    assert comparison.verdict == "regression" and comparison.delta == pytest.approx(-0.8)
    assert comparison.new_losses == ["c0", "c1", "c2", "c3"]
    assert compare_drift(after, before).verdict == "improvement"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    from molting.export import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf", outtype="f32")


@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_a_conversation_longer_than_n_ctx_keeps_the_system_prompt_and_drops_the_oldest_turns(
    engine, tiny_llama_dir, tiny_gguf
):
    backend = load_backend(tiny_llama_dir) if engine == "transformers" else load_backend(tiny_gguf, n_ctx=256)
    assert backend.n_ctx == 256
    config = GenerationConfig(max_new_tokens=16)
    session = ChatSession(backend, "Você é o Cláudio.", config)
    said = [f"Mensagem {i}: o gato come o pão de queijo e vê as estrelas." for i in range(12)]
    try:
        for text in said:
            prompt = session.messages(text)
            assert backend.count_tokens(prompt) + config.max_new_tokens <= 256
            answer = "".join(c.text for c in backend.stream(prompt, config)).strip()
            session.history += [prompt[-1], {"role": "assistant", "content": answer}]
        session.send("E agora?")
        assert session.messages("x")[0] == {"role": "system", "content": "Você é o Cláudio."}
    finally:
        backend.close()
    assert session.dropped > 0 and session.dropped % 2 == 0
    kept = [m["content"] for m in session.history if m["role"] == "user"]
    # the newest turns stay, in order; the oldest are gone
    assert kept == [*said, "E agora?"][-len(kept) :] and said[0] not in kept


def test_the_context_policy_refuses_what_cannot_fit_and_leaves_short_chats_alone(tiny_llama_dir):
    backend = load_backend(tiny_llama_dir)
    session = ChatSession(backend, "Você é o Cláudio.", GenerationConfig(max_new_tokens=4))
    session.send("Oi")
    session.send("Tudo bem?")
    assert session.dropped == 0 and len(session.history) == 4
    with pytest.raises(ConfigError, match="exceeds the context window n_ctx \\(256\\)"):
        ChatSession(backend, "Você é o Cláudio. " * 80).send("Oi")
    backend.close()


def test_interactive_chat_keeps_history_until_reset_and_end_of_input(monkeypatch):
    from typer.testing import CliRunner

    import molting.persona
    from molting import cli

    fake = FakeBackend(["Oi! Sou o Cláudio.", "Lembro: você disse oi.", "Olá de novo."])
    monkeypatch.setattr(molting.persona, "load_backend", lambda model, **options: fake)
    result = CliRunner().invoke(cli.app, ["chat", str(CLAUDIO)], input="Oi\nLembra do que eu disse?\n/reset\nOlá\n")
    assert result.exit_code == 0, result.output
    assert [len(call) for call in fake.calls] == [2, 4, 2]  # system + user; + the first exchange; after /reset
    assert fake.calls[1][1:3] == [
        {"role": "user", "content": "Oi"},
        {"role": "assistant", "content": "Oi! Sou o Cláudio."},
    ]
    assert "Lembro: você disse oi." in result.output and "history cleared" in result.output


def test_interactive_chat_through_a_pipe_with_a_tiny_model(tiny_llama_dir):
    command = [sys.executable, "-m", "molting.cli", "chat", str(CLAUDIO), "--model", str(tiny_llama_dir)]
    command += ["--max-new-tokens", "6"]
    done = subprocess.run(command, input="Oi\nE aí?\n/reset\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Cláudio>") == 2 and "history cleared" in done.stdout


def test_validate_prints_the_longest_conversation_against_the_contexts(tmp_path, tiny_llama_dir):
    """``molting validate`` on a persona with conversations.yaml: the longest one's tokens against the
    model's context (256 for the tiny model: it outgrows it) and llama.cpp's n_ctx; none without the file."""
    import shutil

    from typer.testing import CliRunner

    from molting.cli import app

    persona_dir = tmp_path / "claudio"
    shutil.copytree(CLAUDIO, persona_dir)
    args = ["validate", str(persona_dir), "--base", str(tiny_llama_dir), "--max-length", "4096"]
    shown = CliRunner().invoke(app, [*args, "--max-new-tokens", "64"], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())  # the console wraps long lines
    assert "held-out conversations: 8; the longest (" in text and "answers of 64 tokens" in text
    assert "the model's context: 256 tokens, molting run's llama.cpp n_ctx: 2048" in text
    assert "outgrows the context" in text
    (persona_dir / "conversations.yaml").unlink()
    bare = CliRunner().invoke(app, args, terminal_width=400)
    assert bare.exit_code == 0 and "held-out conversations" not in bare.output
