"""The fit planner's arithmetic against hand-computed cases, and its type rules against llama.cpp's quantizer."""

import pytest

from molting import fit
from molting.errors import ConfigError
from molting.fit import GIB, MIB

# A Llama-shaped config small enough to add up by hand.
SMALL = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("ggml_type", "bits"), [("Q4_K", 4.5), ("Q6_K", 6.5625), ("Q8_0", 8.5), ("Q5_0", 5.5), ("F16", 16), ("F32", 32)]
)
def test_bytes_per_weight(ggml_type, bits):
    assert fit.bytes_per_weight(ggml_type) == bits / 8


def test_kv_cache_by_hand():
    tinyllama, phi3 = fit.load_shape("tinyllama-1.1b"), fit.load_shape("phi-3-mini")
    # 2 x n_layer x n_ctx x n_head_kv x head_dim x bytes
    assert fit.kv_cache_bytes(tinyllama, 2048, "f16") == 2 * 22 * 2048 * 4 * 64 * 2 == 44 * MIB
    assert fit.kv_cache_bytes(tinyllama, 2048, "q8_0") == 2 * 22 * 2048 * 4 * 64 * 34 // 32
    assert fit.kv_cache_bytes(phi3, 4096, "f16") == 2 * 32 * 4096 * 32 * 96 * 2 == 1536 * MIB
    with pytest.raises(ConfigError, match="q4_0"):
        fit.kv_cache_bytes(phi3, 4096, "q4_0")


def test_weights_by_hand():
    shape = fit.shape_from_config(SMALL, "small")
    matrices = 2 * 256 * 1024 + 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512)  # embd, output; q o k v, ffn
    norms = 256 * (1 + 2 * 2)
    total = sum(fit.tensor_bytes(t, "Q8_0", shape) for t in shape.tensors)
    assert total == matrices * 34 // 32 + norms * 4  # Q8_0: 34 bytes per 32 weights; norms F32
    f16 = sum(fit.tensor_bytes(t, "F16", shape) for t in shape.tensors)
    assert f16 == matrices * 2 + norms * 4


def test_q4_k_m_mix_follows_llama_cpp_rules():
    phi3 = fit.load_shape("phi-3-mini")  # 32 layers: "more bits" for 0-3, 28-31 and every third from 6
    by_name = {t.name: t for t in phi3.tensors}

    def kind(name):
        return fit.tensor_type(by_name[name], "Q4_K_M", phi3)

    assert [i for i in range(32) if fit.use_more_bits(i, 32)] == [
        0,
        1,
        2,
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        28,
        29,
        30,
        31,
    ]
    assert kind("blk.0.attn_qkv.weight") == "Q6_K" and kind("blk.4.attn_qkv.weight") == "Q4_K"
    assert kind("blk.6.ffn_down.weight") == "Q6_K" and kind("blk.7.ffn_down.weight") == "Q4_K"
    assert kind("blk.6.ffn_up.weight") == "Q4_K" and kind("blk.6.attn_norm.weight") == "F32"
    assert kind("output.weight") == "Q6_K" and kind("token_embd.weight") == "Q4_K"
    # The mix adds up to 2.396 GB of tensors (the GGUF's metadata adds a few MB).
    assert round(sum(fit.tensor_bytes(t, "Q4_K_M", phi3) for t in phi3.tensors) / 1e9, 2) == 2.40


def test_rows_not_multiple_of_256_fall_back():
    smol = fit.load_shape("smollm2-135m")  # rows of 576; tied embeddings
    by_name = {t.name: t for t in smol.tensors}
    assert fit.tensor_type(by_name["blk.0.attn_q.weight"], "Q4_K_M", smol) == "Q5_0"
    assert fit.tensor_type(by_name["blk.0.attn_v.weight"], "Q4_K_M", smol) == "Q8_0"  # Q6_K -> Q8_0
    assert fit.tensor_type(by_name["blk.0.ffn_down.weight"], "Q4_K_M", smol) == "Q6_K"  # rows of 1536
    assert fit.tensor_type(by_name["token_embd.weight"], "Q4_K_M", smol) == "Q8_0"  # tied: the output's rule


def test_types_match_llama_cpp_quantizer(tiny_llama_256_dir, tmp_path):
    """Every tensor of a file quantized by llama.cpp has the type and size the planner predicts."""
    from molting.export import quantize, write_gguf

    f16 = write_gguf(tiny_llama_256_dir, tmp_path / "tiny.F16.gguf", outtype="f16")
    quantized = fit.shape_from_gguf(quantize(f16, tmp_path / "tiny.Q4_K_M.gguf", "Q4_K_M", n_threads=1))
    predicted = fit.load_shape(tiny_llama_256_dir)
    assert quantized.file_type == "Q4_K_M" and len(quantized.tensors) == len(predicted.tensors)
    mine = {
        t.name: (fit.tensor_type(t, "Q4_K_M", predicted), fit.tensor_bytes(t, "Q4_K_M", predicted))
        for t in predicted.tensors
    }
    for t in quantized.tensors:
        assert mine[t.name] == (t.ggml_type, t.nbytes), t.name
    assert {t.ggml_type for t in quantized.tensors} >= {"Q4_K", "Q6_K", "F32"}  # the mix is exercised
    # The repacked copy from the file's own types is the one predicted from the configuration.
    assert fit.repack_bytes(quantized, "Q4_K_M") == fit.repack_bytes(predicted, "Q4_K_M") > 0


def test_compute_buffer_matches_llama_cpp_log():
    # llama-cpp-python 0.3.36 logged "CPU compute buffer size = 99.38 MiB" for SmolLM2-135M at
    # n_ctx 2048: logits of 512 tokens (49152 x 512 f32) and 3 hidden states (576 x 512 f32).
    smol = fit.load_shape("smollm2-135m")
    assert fit.compute_bytes(smol, 2048) == 4 * (49152 * 512 + 3 * 576 * 512)
    assert round(fit.compute_bytes(smol, 2048) / MIB, 2) == 99.38
    # TinyLlama: 32 heads' scores (32 x 2048 x 512 f32) and the mask (2048 x 512 f32) dominate;
    # a 32-head random model logged 134.63 MiB (hidden 256: 1.5 MiB of hidden states).
    tinyllama = fit.load_shape("tinyllama-1.1b")
    assert fit.compute_bytes(tinyllama, 2048) == 4 * (32 * 2048 * 512 + 2048 * 512 + 3 * 2048 * 512)
    assert fit.compute_bytes(tinyllama, 2048, flash_attn=True) == 4 * (32000 * 512 + 3 * 2048 * 512)
    # Resident on the CPU: a 512-token prompt's graph, its cells padded to 256, logits for one token.
    assert fit.resident_compute_bytes(tinyllama, 300) == 4 * (32 * 512 * 300 + 512 * 300 + 3 * 2048 * 300)


def test_repacked_tensors_by_hand():
    """Q4_K matrices with rows (ne[1]) a multiple of 8 are copied into CPU_REPACK; nothing else is."""
    shape = fit.shape_from_config(SMALL, "small")  # 2 layers; Q4_K_M gives blk.1 attn_v/ffn_down Q6_K
    by_name = {t.name: t for t in shape.tensors}
    assert fit.repacked(by_name["blk.0.attn_k.weight"], "Q4_K_M", shape)  # Q4_K, 128 rows
    assert not fit.repacked(by_name["blk.1.attn_v.weight"], "Q4_K_M", shape)  # Q6_K: no AVX2 repack
    assert not fit.repacked(by_name["output.weight"], "Q4_K_M", shape)  # Q6_K
    assert not fit.repacked(by_name["token_embd.weight"], "Q4_K_M", shape)  # Q4_K, but GET_ROWS
    assert not fit.repacked(by_name["blk.0.attn_norm.weight"], "Q4_K_M", shape)  # F32, 1-D
    layer0 = 256 * 256 * 2 + 256 * 128 * 2 + 256 * 512 * 3  # q, o; k, v; gate, up, down: all Q4_K
    layer1 = layer0 - 256 * 128 - 512 * 256  # attn_v and ffn_down are Q6_K
    assert fit.repack_bytes(shape, "Q4_K_M") == (layer0 + layer1) * 144 // 256  # Q4_K: 144 bytes per 256
    assert fit.repack_bytes(shape, "Q4_K_M", n_gpu_layers=1) == layer0 * 144 // 256  # blk.1 on the GPU
    assert fit.repack_bytes(shape, "Q4_K_M", n_gpu_layers=-1) == 0
    assert fit.repack_bytes(shape, "Q8_0") == fit.repack_bytes(shape, "F16") == 0
    assert fit.repack_bytes(shape, "Q4_0") == (layer0 + layer0) * 18 // 32  # Q4_0 everywhere but the output
    # Rows not a multiple of 8: gate/up stay Q4_K (columns of 256) but are not repacked.
    odd = fit.shape_from_config({**SMALL, "intermediate_size": 516}, "odd")
    gate = next(t for t in odd.tensors if t.name == "blk.0.ffn_gate.weight")
    assert fit.tensor_type(gate, "Q4_K_M", odd) == "Q4_K" and not fit.repacked(gate, "Q4_K_M", odd)
    # The estimate counts the copy on top of the mapped file, only when repacking is on.
    on, off = (fit.estimate(shape, "Q4_K_M", 512, repack=r) for r in (True, False))
    assert on.weights_cpu == off.weights_cpu and off.weights_repack == 0
    assert on.ram - off.ram == on.weights_repack == fit.repack_bytes(shape, "Q4_K_M")
    assert on.vram == off.vram


def test_repack_buffer_matches_llama_cpp_log():
    # llama-cpp-python 0.3.36 (AVX2 build) logged "CPU_REPACK model buffer size" 7.59 MiB for
    # SmolLM2-135M Q4_K_M (only the 16 Q4_K ffn_down; rows of 576 make the rest Q5_0) and
    # 455.06 MiB for the random TinyLlama-1.1B Q4_K_M (every Q4_K matrix but token_embd).
    assert round(fit.repack_bytes(fit.load_shape("smollm2-135m"), "Q4_K_M") / MIB, 2) == 7.59
    tinyllama = fit.load_shape("tinyllama-1.1b")  # 10 of 22 layers have Q6_K attn_v and ffn_down
    layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632
    more_bits = layer - 2048 * 256 - 5632 * 2048
    assert fit.repack_bytes(tinyllama, "Q4_K_M") == (12 * layer + 10 * more_bits) * 144 // 256
    assert round(fit.repack_bytes(tinyllama, "Q4_K_M") / MIB, 2) == 455.06


def test_layers_split_between_devices():
    shape = fit.shape_from_config(SMALL, "small")
    cpu = fit.estimate(shape, "Q8_0", 512, n_gpu_layers=0)
    one = fit.estimate(shape, "Q8_0", 512, n_gpu_layers=1)
    full = fit.estimate(shape, "Q8_0", 512, n_gpu_layers=-1)
    layer_kv = 2 * 512 * 2 * 64 * 2
    assert cpu.vram == 0 and cpu.kv_cpu == 2 * layer_kv and cpu.weights_gpu == 0
    assert one.kv_gpu == layer_kv and one.kv_cpu == layer_kv
    assert one.weights_gpu == 589824 * 34 // 32 + 2 * 256 * 4  # blk.1: matrices and norms
    assert full.n_gpu_layers == 3 and full.weights_cpu == 256 * 1024 * 34 // 32  # only token_embd stays
    assert full.vram == full.weights_gpu + full.kv_gpu + full.compute_gpu + fit.DEFAULT_RESERVE_BYTES
    with pytest.raises(ConfigError, match="flash attention"):
        fit.estimate(shape, "Q8_0", 512, kv_type="q8_0", flash_attn=False)


def test_phi3_on_4_gib():
    shape = fit.load_shape("phi-3-mini")
    at_2k = fit.plan(shape, 4 * GIB, 2048).best
    assert (at_2k.quant, at_2k.kv_type, at_2k.n_gpu_layers) == ("Q4_K_M", "f16", 33)
    at_4k = fit.plan(shape, 4 * GIB, 4096)
    assert (at_4k.best.quant, at_4k.best.kv_type, at_4k.best.n_gpu_layers) == ("Q4_K_M", "q8_0", 33)
    assert at_4k.full("Q4_K_M", "f16").vram > 4 * GIB * (1 - fit.MARGIN)  # why the KV cache changed
    assert any("n_gpu_layers=" in line for line in fit.describe(at_4k))


def test_parse_size_and_bad_inputs(tmp_path):
    assert fit.parse_size("4GiB") == 4 * GIB and fit.parse_size("512 MiB") == 512 * MIB and fit.parse_size("4GB") == 4e9
    with pytest.raises(ConfigError, match="unit"):
        fit.parse_size("4")
    with pytest.raises(ConfigError, match="not found"):
        fit.load_shape(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ConfigError, match="bad.gguf"):
        fit.load_shape(tmp_path / "bad.gguf")
    with pytest.raises(ConfigError, match="phi-3-mini"):
        fit.load_shape("gpt-17")


def test_fit_command_prints_the_plan():
    from typer.testing import CliRunner

    from molting.cli import app

    result = CliRunner().invoke(app, ["fit", "phi-3-mini", "--vram", "4GiB", "--ctx", "4096"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "best plan: Q4_K_M, n_gpu_layers=-1" in result.output and "KV cache q8_0" in result.output
    assert "with an f16 KV cache (1536 MiB instead of 816 MiB)" in result.output
    for repack in (True, False):
        options = [] if repack else ["--no-repack"]
        out = CliRunner().invoke(app, ["fit", "tinyllama-1.1b", "--vram", "1GiB", *options], env={"COLUMNS": "200"})
        ram = fit.plan(fit.load_shape("tinyllama-1.1b"), GIB, 2048, repack=repack).best.ram
        assert out.exit_code == 0 and f"RAM {ram / MIB:.0f} MiB" in out.output, out.output
    bad = CliRunner().invoke(app, ["fit", "phi-3-mini", "--vram", "4"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output
