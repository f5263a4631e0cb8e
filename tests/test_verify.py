"""The export's behaviour check: llama.cpp against transformers on the persona's text, stop and leak, --quant auto."""

import json

import pytest

from molting.backends.base import GenerationConfig
from molting.errors import ExportError
from molting.eval import load_rubric
from molting.export import write_gguf
from molting.export.verify import (
    AUTO_CANDIDATES,
    FileCheck,
    VerifyConfig,
    VerifyReport,
    check_unquantized,
    choose_quant,
    compare_gguf,
    persona_texts,
    reference_logprobs,
    stop_and_leak,
)
from molting.pipeline import export_gguf
from tests.fakes import FakeBackend
from tests.test_pipeline import SilentUI, make_persona


@pytest.fixture(scope="module")
def persona(tmp_path_factory):
    return make_persona(tmp_path_factory.mktemp("persona"))


@pytest.fixture(scope="module")
def reference(persona, tiny_llama_256_dir, tiny_tokenizer):
    texts = persona_texts(persona, load_rubric(persona), tiny_tokenizer, max_positions=200)
    return texts, reference_logprobs(tiny_llama_256_dir, texts)


def test_persona_texts_score_the_shared_system_prompt_once(persona, tiny_tokenizer):
    texts = persona_texts(persona, load_rubric(persona), tiny_tokenizer, max_positions=200)
    first = tiny_tokenizer.apply_chat_template(
        persona.messages("Quem é o João?"), tokenize=False, add_generation_prompt=True
    )
    assert texts[0] == (tiny_tokenizer(first, add_special_tokens=False)["input_ids"], 0)
    system = tiny_tokenizer(f"<|im_start|>system\n{persona.system_prompt}<|im_end|>\n")["input_ids"]
    assert all(start >= len(system) and ids[: len(system)] == system for ids, start in texts[1:])
    assert len(texts) == 2 + 4  # two rubric questions, then the four dataset conversations
    assert sum(len(ids) - start for ids, start in texts) <= 200
    cut = persona_texts(persona, load_rubric(persona), tiny_tokenizer, max_positions=30)
    assert sum(len(ids) - start for ids, start in cut) == 30


def test_f16_agrees_and_a_conversion_error_fails_the_gate(reference, tiny_llama_256_dir, tmp_path, monkeypatch):
    texts, ref = reference
    f16 = write_gguf(tiny_llama_256_dir, tmp_path / "m.gguf", outtype="f16")
    top1, mean_kl, max_kl = compare_gguf(f16, texts, ref, n_threads=2)
    assert top1 >= 0.99 and mean_kl <= 1e-3 and max_kl >= mean_kl > 0
    check_unquantized(FileCheck("F16", str(f16), 1, top1, mean_kl, max_kl), VerifyConfig())

    # Negative control: the same file without the Q/K permutation is caught.
    monkeypatch.setattr("molting.export.architectures.llama.permute_qk", lambda weight, n_head: weight)
    broken = write_gguf(tiny_llama_256_dir, tmp_path / "broken.gguf", outtype="f16")
    top1, mean_kl, max_kl = compare_gguf(broken, texts, ref, n_threads=2)
    assert top1 < 0.9 and mean_kl > 1e-2
    with pytest.raises(ExportError, match=r"same top-1 \d+\.\d+% \(at least 99% required\), mean KL .* no file"):
        check_unquantized(FileCheck("F16", str(broken), 1, top1, mean_kl, max_kl), VerifyConfig())


def test_kv_cache_reuse_gives_the_fresh_evaluation(reference, tiny_llama_256_dir, tmp_path):
    """compare_gguf keeps the shared system prompt in llama.cpp's cache; a text whose shared prefix
    is longer than the previous text's (same first word) must not reuse the previous text's tail."""
    texts, _ = reference
    f16 = write_gguf(tiny_llama_256_dir, tmp_path / "m.gguf", outtype="f16")
    ids0, _ = texts[0]
    # a text sharing 5 more tokens with the first than the previous text does
    tricky = [texts[0], texts[1], (ids0[: texts[1][1] + 5] + texts[1][0][texts[1][1] :], texts[1][1] + 5)]
    tricky_ref = reference_logprobs(tiny_llama_256_dir, tricky)
    fresh = [compare_gguf(f16, [t], [r], n_threads=2) for t, r in zip(tricky, tricky_ref, strict=True)]
    together = compare_gguf(f16, tricky, tricky_ref, n_threads=2)
    weights = [len(ids) - start for ids, start in tricky]
    expected_kl = sum(w * f[1] for w, f in zip(weights, fresh, strict=True)) / sum(weights)
    assert together[1] == pytest.approx(expected_kl, rel=1e-3) and together[2] == max(f[2] for f in fresh)


def test_export_with_a_wrong_f16_fails_and_leaves_no_file(persona, tiny_llama_256_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("molting.export.architectures.llama.permute_qk", lambda weight, n_head: weight)
    config = VerifyConfig(max_positions=64, n_threads=2)
    with pytest.raises(ExportError, match="does not compute what the model computes"):
        export_gguf(persona, tiny_llama_256_dir, tmp_path / "x.Q8_0.gguf", "Q8_0", SilentUI(), verify=config)
    assert list(tmp_path.iterdir()) == []


def test_stop_and_leak_counts_cut_replies_and_template_tokens(persona):
    rubric = load_rubric(persona)
    answers = ["Sou o Cláudio.", "uma resposta que não acaba nunca " * 10 + "<|im_start|>user"]
    check = stop_and_leak(FakeBackend(answers), persona, rubric, GenerationConfig(max_new_tokens=20))
    assert (check.replies, check.stopped, check.cut) == (2, 1, ["Me fala sobre você"])
    assert check.leaks == [] and not check.ok  # cut at 20 words, before the leaked token
    leaky = stop_and_leak(FakeBackend(["Oi<|im_end|>", "Tchau."]), persona, rubric, GenerationConfig())
    assert (leaky.stopped, leaky.leaks, leaky.ok) == (2, ["Quem é o João?: <|im_end|>"], False)
    clean = stop_and_leak(FakeBackend(["Oi.", "Tchau."]), persona, rubric, GenerationConfig())
    assert clean.ok


def test_choose_quant_takes_the_smallest_under_the_threshold():
    def check(quant, size, kl):
        return FileCheck(quant, f"{quant}.gguf", size, 0.9, kl, kl)

    checks = [check("F16", 270, 1e-5), check("Q4_K_M", 100, 0.06), check("Q6_K", 130, 0.009), check("Q8_0", 140, 0.003)]
    assert choose_quant(checks, 0.01).quant == "Q6_K"
    assert choose_quant(checks, 0.001).quant == "F16"
    assert choose_quant(checks[1:], 0.001) is None


@pytest.mark.parametrize("max_kl", [0.01, 0.05])
def test_quant_auto_keeps_the_chosen_file_and_writes_the_table(persona, tiny_llama_256_dir, tmp_path, max_kl):
    """On the random 256-wide llama every quant type loses much (Q8_0: ~0.02 nats): at 0.01 nats
    auto falls back to F16, at 0.05 it keeps a quantized file. Either way the choice is the
    first candidate, smallest first, at or under the threshold."""
    ui = SilentUI()
    generation = GenerationConfig(max_new_tokens=8)
    config = VerifyConfig(max_positions=128, n_threads=2, generation=generation, auto_max_kl=max_kl)
    result = export_gguf(persona, tiny_llama_256_dir, lambda q: tmp_path / f"m.{q}.gguf", "auto", ui, verify=config)
    report = result.check
    tried = [f.quant for f in report.files]
    assert tried[0] == "F16" and tried[1:] == list(AUTO_CANDIDATES[: len(tried) - 1])
    under = [f for f in report.files[1:] if f.mean_kl <= config.auto_max_kl]
    assert under == ([report.files[-1]] if under else [])  # tried smallest first, stopped at the first under
    assert result.quant == report.chosen == (under[0].quant if under else "F16")
    assert (result.quant == "F16") == (max_kl == 0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{result.quant}.gguf", f"m.{result.quant}.verify.json"]
    saved = json.loads((tmp_path / f"m.{result.quant}.verify.json").read_text())
    assert saved["chosen"] == result.quant and len(saved["files"]) == len(tried)
    assert saved["files"][tried.index(result.quant)]["stop"]["replies"] == 2
    assert f"`--quant auto` chose **{result.quant}**" in report.to_markdown()
    assert ui.steps[-1] == f"verify {tried}"


def test_no_verify_writes_no_table_and_auto_needs_the_check(persona, tiny_llama_256_dir, tmp_path):
    result = export_gguf(persona, tiny_llama_256_dir, tmp_path / "m.F16.gguf", "F16", SilentUI(), verify=None)
    assert result.check is None and sorted(p.name for p in tmp_path.iterdir()) == ["m.F16.gguf"]
    with pytest.raises(ExportError, match="auto .* --no-verify"):
        export_gguf(persona, tiny_llama_256_dir, tmp_path / "a.gguf", "auto", SilentUI(), verify=None)


def test_report_markdown_lists_every_file():
    report = VerifyReport("ref", texts=3, positions=120)
    report.files.append(FileCheck("F16", "m.F16.gguf", 2**20, 1.0, 1e-5, 1e-4))
    report.files.append(FileCheck("Q8_0", "m.Q8_0.gguf", 2**19, 0.96, 0.004, 0.2))
    text = report.to_markdown()
    assert "| F16 | 1.0 | 100.0% | 0.00001 | 0.000 | not run |" in text
    assert "| Q8_0 | 0.5 | 96.0% | 0.00400 | 0.200 | not run |" in text
    assert "120 positions of 3 texts" in text
