"""The Backend contract, run against both engines on the same tiny random model.

transformers reads the model directory, llama.cpp a F32 GGUF written from it by
molting's writer; each test holds for both.
"""

from pathlib import Path

import pytest

from molting.backends import Chunk, GenerationConfig, load_backend
from molting.backends.base import stop_at
from molting.errors import ConfigError
from tests.conftest import save_tiny_llama

MESSAGES = [{"role": "system", "content": "Você é o Cláudio."}, {"role": "user", "content": "Quem é você?"}]
ENGINES = ["transformers", "llama.cpp"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    from molting.export import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf", outtype="f32")


@pytest.fixture(scope="module", params=ENGINES)
def backend(request, tiny_llama_dir, tiny_gguf):
    engine = load_backend(tiny_llama_dir) if request.param == "transformers" else load_backend(tiny_gguf, n_ctx=256)
    assert engine.name == request.param
    yield engine
    engine.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streaming_yields_the_text_of_generate_token_by_token(backend, temperature):
    config = GenerationConfig(max_new_tokens=16, temperature=temperature, seed=3)
    chunks = list(backend.stream(MESSAGES, config))
    response = backend.generate(MESSAGES, config)
    assert "".join(c.text for c in chunks).strip() == response.text
    assert response.completion_tokens > 1
    # a chunk per decoded token (a character split over tokens waits for its last byte), then the final one
    counts = [c.generated_tokens for c in chunks[:-1]]
    assert len(counts) >= 3 and counts == sorted(set(counts)) and counts[-1] <= response.completion_tokens
    assert chunks[-1].finish_reason == response.finish_reason and chunks[-2].finish_reason is None


def test_stop_string_ends_the_answer_before_it(backend):
    full = backend.generate(MESSAGES, GenerationConfig(max_new_tokens=24))
    assert len(full.text) > 12, full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = backend.generate(MESSAGES, GenerationConfig(max_new_tokens=24, stop=(stop, "never generated §§")))
    assert cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens  # the engine stopped generating


def test_top_k_1_is_greedy_while_sampling(backend):
    greedy = backend.chat(MESSAGES, max_new_tokens=16)
    for seed in (1, 2):
        assert backend.chat(MESSAGES, max_new_tokens=16, temperature=1.5, top_k=1, seed=seed) == greedy
    # negative control: the same sampling without top_k leaves greedy decoding
    assert backend.chat(MESSAGES, max_new_tokens=16, temperature=1.5, seed=1) != greedy


def test_count_tokens_is_the_prompt_of_a_generation(backend, tiny_tokenizer):
    response = backend.generate(MESSAGES, GenerationConfig(max_new_tokens=2))
    assert backend.count_tokens(MESSAGES) == response.prompt_tokens
    text = "Olá! Tudo bem? Hello, how are you?"
    assert backend.count_tokens(text) == len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert backend.count_tokens(MESSAGES + [{"role": "user", "content": text}]) > response.prompt_tokens


def test_memory_reports_rss_and_no_vram_on_cpu(backend):
    memory = backend.memory()
    assert 0 < memory.rss_mib <= memory.peak_rss_mib
    assert (memory.vram_mib, memory.peak_vram_mib) == (None, None)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama with hidden size 1024: 77 MiB of fp32 weights, far above RSS noise."""
    from molting.export import write_gguf

    directory = save_tiny_llama(tmp_path_factory.mktemp("wide"), tiny_tokenizer, hidden_size=1024)
    gguf = write_gguf(directory, tmp_path_factory.mktemp("wide_gguf") / "wide.F32.gguf", outtype="f32")
    weights_mib = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20
    return {"transformers": directory, "llama.cpp": gguf}, weights_mib


@pytest.mark.parametrize("engine", ENGINES)
def test_close_releases_memory(wide_llama, engine):
    paths, weights_mib = wide_llama
    options = {} if engine == "transformers" else {"n_ctx": 128}
    warmup = load_backend(paths[engine], **options)
    warmup.close()  # imports and the engine's one-off allocations, out of the measurement
    start = warmup.memory().rss_mib
    backend = load_backend(paths[engine], **options)
    backend.generate(MESSAGES, GenerationConfig(max_new_tokens=4))
    loaded = backend.memory().rss_mib
    backend.close()
    closed = backend.memory().rss_mib
    assert loaded - start > 0.8 * weights_mib, (start, loaded, weights_mib)
    assert loaded - closed > 0.8 * weights_mib, (loaded, closed, weights_mib)
    with pytest.raises(ConfigError, match="closed"):
        backend.generate(MESSAGES)
    backend.close()  # idempotent


def _chunks(*texts, reason="length"):
    """A scripted stream; records whether the consumer closed it."""
    closed = []

    def stream():
        try:
            for i, text in enumerate(texts, start=1):
                yield Chunk(text, 5, i, reason if i == len(texts) else None)
        finally:
            closed.append(True)

    return stream(), closed


@pytest.mark.parametrize(
    ("texts", "stop", "expected", "reason"),
    [
        (("Olá, ", "tudo ", "bem?"), ("tudo",), "Olá, ", "stop"),
        (("Olá, tu", "do bem?"), ("tudo",), "Olá, ", "stop"),  # across chunks
        (("Olá, tu", "rma"), ("tudo",), "Olá, turma", "length"),  # a prefix that does not complete
        (("a", "b", "c"), ("bc", "abc"), "", "stop"),  # the earliest match wins
        (("Olá",), (), "Olá", "length"),
    ],
)
def test_stop_at(texts, stop, expected, reason):
    stream, closed = _chunks(*texts)
    out = list(stop_at(stream, stop))
    assert "".join(c.text for c in out) == expected
    assert out[-1].finish_reason == reason
    assert all(c.finish_reason is None for c in out[:-1])
    assert closed == [True]


def test_cli_chat_prints_the_answer_as_it_streams(tiny_gguf, monkeypatch):
    from typer.testing import CliRunner

    from molting import cli
    from molting.persona import Persona

    persona_dir = Path(__file__).resolve().parents[1] / "examples" / "claudio"
    pieces = []
    print_ = cli.console.print
    monkeypatch.setattr(cli.console, "print", lambda *a, **k: (pieces.append(a), print_(*a, **k)))
    args = ["chat", str(persona_dir), "Quem é você?", "--model", str(tiny_gguf), "--max-new-tokens", "12"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    persona = Persona.load(persona_dir)
    backend = load_backend(tiny_gguf)
    expected = backend.generate(persona.messages("Quem é você?"), GenerationConfig(max_new_tokens=12)).text
    backend.close()
    assert result.stdout.strip() == f"{persona.name}> {expected}"
    assert len(pieces) >= 4  # the name, at least two pieces of the answer, the newline


@pytest.mark.gpu
def test_vram_reported_and_released_on_cuda(wide_llama):
    """Not run here (no GPU): torch's allocator figures through memory(), before and after close()."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    paths, weights_mib = wide_llama
    backend = load_backend(paths["transformers"], device="cuda")
    backend.generate(MESSAGES, GenerationConfig(max_new_tokens=4))
    loaded = backend.memory()
    assert loaded.vram_mib > 0.9 * weights_mib and loaded.peak_vram_mib >= loaded.vram_mib
    backend.close()
    assert backend.memory().vram_mib < loaded.vram_mib - 0.9 * weights_mib
