import pytest

from molting.backends import GenerationConfig, load_backend
from molting.backends.transformers import TransformersBackend
from molting.errors import ConfigError, ModelFileError

MESSAGES = [{"role": "system", "content": "Você é o Cláudio."}, {"role": "user", "content": "Quem é você?"}]
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def prompt_ids(hf: TransformersBackend) -> list[int]:
    """MESSAGES rendered and tokenized by transformers (v5 returns a dict even when tokenizing)."""
    return hf.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return TransformersBackend(tiny_llama_dir)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    from molting.export import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf", outtype="f32")


def test_stream_joins_into_generate(hf):
    config = GenerationConfig(max_new_tokens=12)
    chunks = list(hf.stream(MESSAGES, config))
    response = hf.generate(MESSAGES, config)
    assert "".join(c.text for c in chunks).strip() == response.text
    assert chunks[-1].finish_reason == response.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert response.prompt_tokens == len(prompt_ids(hf))


def test_length_finish_and_no_template_tokens(hf):
    response = hf.generate(MESSAGES, GenerationConfig(max_new_tokens=8))
    if response.finish_reason == "length":
        assert response.completion_tokens == 8
    else:
        assert response.completion_tokens < 8
    assert not any(t in response.text for t in TEMPLATE_TOKENS)


def test_greedy_is_deterministic_and_seed_repeats_sampling(hf):
    assert hf.chat(MESSAGES, max_new_tokens=10) == hf.chat(MESSAGES, max_new_tokens=10)
    sampled = [hf.chat(MESSAGES, max_new_tokens=10, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3, 3.0])
def test_both_engines_decode_the_same_greedy_tokens(hf, tiny_gguf, repetition_penalty):
    """F32 weights, greedy: llama.cpp and transformers agree token for token, penalty included
    (on generated tokens only: a penalty on the prompt in one engine would change the text)."""
    cpp = load_backend(tiny_gguf, n_ctx=256)
    try:
        config = GenerationConfig(max_new_tokens=24, repetition_penalty=repetition_penalty)
        a, b = hf.generate(MESSAGES, config), cpp.generate(MESSAGES, config)
        assert cpp.prompt_tokens(MESSAGES) == prompt_ids(hf)
        assert (a.text, a.completion_tokens) == (b.text, b.completion_tokens)
    finally:
        cpp.close()


def test_llamacpp_refuses_prompts_longer_than_n_ctx(tiny_gguf):
    cpp = load_backend(tiny_gguf, n_ctx=32)
    with pytest.raises(ConfigError, match="exceeds n_ctx"):
        cpp.generate(MESSAGES, GenerationConfig(max_new_tokens=30))
    cpp.close()


def test_llamacpp_prefill_threads_follow_n_threads(tiny_gguf):
    import llama_cpp

    cpp = load_backend(tiny_gguf, n_ctx=64, n_threads=1)
    try:
        ctx = cpp.llm._ctx.ctx
        assert (llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (1, 1)
    finally:
        cpp.close()
    cpp = load_backend(tiny_gguf, n_ctx=64, n_threads=1, n_threads_batch=2)
    try:
        assert llama_cpp.llama_n_threads_batch(cpp.llm._ctx.ctx) == 2
    finally:
        cpp.close()


def test_invalid_options_and_messages(hf):
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ConfigError, match=r"messages\[0\].role"):
        hf.chat([{"role": "bot", "content": "x"}])
    with pytest.raises(ConfigError, match="top_k"):
        GenerationConfig(top_k=-1)
    with pytest.raises(ConfigError, match="stop"):
        GenerationConfig(stop=("",))
    with pytest.raises(ConfigError, match="loader"):
        TransformersBackend("unused", dtype="4bit", loader="mine")


def test_load_backend_dispatch(tiny_llama_dir, tmp_path):
    assert load_backend(tiny_llama_dir).name == "transformers"
    with pytest.raises(ConfigError, match="not a .gguf file"):
        load_backend(tmp_path)
    with pytest.raises(ModelFileError, match="missing.gguf: file not found"):
        load_backend(tmp_path / "missing.gguf")


def test_batched_answers_equal_one_by_one(hf, tiny_llama_dir, tiny_gguf):
    """Left-padded batches decode the same greedy tokens as single prompts, on both engines' paths."""
    conversations = [
        MESSAGES,
        [{"role": "user", "content": "Oi"}],
        [*MESSAGES, {"role": "assistant", "content": "Sou o Cláudio."}, {"role": "user", "content": "E o João?"}],
    ]
    config = GenerationConfig(max_new_tokens=10, repetition_penalty=1.3)
    one_by_one = [hf.generate(m, config) for m in conversations]
    done: list[int] = []
    pairs = TransformersBackend(tiny_llama_dir, batch_size=2)
    batched = pairs.generate_batch(conversations, config, progress=done.append)
    assert [r.text for r in batched] == [r.text for r in one_by_one]
    assert [r.finish_reason for r in batched] == [r.finish_reason for r in one_by_one]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in one_by_one]
    assert done == [2, 3]  # one call per batch of 2
    cpp = load_backend(tiny_gguf, n_ctx=256)
    try:
        assert [r.text for r in cpp.generate_batch(conversations, config)] == [r.text for r in one_by_one]
    finally:
        cpp.close()


def test_batched_stop_strings_cut_each_row(hf):
    """A stop string found in a row's text ends that row with finish_reason "stop"."""
    config = GenerationConfig(max_new_tokens=12)
    texts = [r.text for r in hf.generate_batch([MESSAGES, MESSAGES[1:]], config)]
    stop = next((t[2:4] for t in texts if len(t) > 4), None)
    assert stop, f"answers too short to cut: {texts}"
    cut = hf.generate_batch([MESSAGES, MESSAGES[1:]], GenerationConfig(max_new_tokens=12, stop=(stop,)))
    for full, short in zip(texts, cut, strict=True):
        if stop in full:
            assert short.text == full[: full.index(stop)].strip() and short.finish_reason == "stop"
        else:
            assert short.text == full


def test_batch_size_is_checked(tiny_llama_dir):
    with pytest.raises(ConfigError, match="batch_size"):
        TransformersBackend(tiny_llama_dir, batch_size=0)
