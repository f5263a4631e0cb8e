"""Export a Phi-3-mini-sized model: molting's writer and quantizer beside llama.cpp's converter.

Builds a random-weight model with Phi-3-mini-4k-instruct's exact configuration (3.82 B
parameters, vocab_size 32064, bf16 safetensors) and a SentencePiece tokenizer trained here
with byte fallback (the persona's own text; Phi-3's 11 added tokens after its pieces,
padded to 32064), then times, each in its own process under ``/usr/bin/time -v``:

1. molting's F16 writer (``molting.export.write_gguf``),
2. llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` (from the llama-cpp-python sdist),
3. molting's Q4_K_M quantizer (``molting.export.quantize``: llama.cpp's
   ``llama_model_quantize``, the function the ``llama-quantize`` tool calls).

It compares the two F16 files tensor for tensor and the Q4_K_M size with the published
Phi-3-mini-4k-instruct-q4.gguf (2,393,231,072 bytes). Usage::

    flock /tmp/molting-heavy.lock python benchmarks/export_phi3.py --work /tmp/phi3-bench \\
        --llama-cpp /tmp/lcpp/llama_cpp_python-X/vendor/llama.cpp --out benchmarks/export_phi3.json

The multi-GB files under ``--work`` are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PUBLISHED_Q4_K_M_BYTES = 2_393_231_072  # microsoft/Phi-3-mini-4k-instruct-gguf, Phi-3-mini-4k-instruct-q4.gguf
# Phi-3-mini-4k-instruct's config.json.
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 32000,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32064,
}
PHI3_ADDED = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LAYERS_PER_SHARD = 8


def weight_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Phi3ForCausalLM's tensors in save order, with their shapes."""
    h, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    qkv = h + 2 * config["num_key_value_heads"] * (h // config["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight", (qkv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight", (2 * ff, h)),
            (p + "mlp.down_proj.weight", (h, ff)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_model(directory: Path, layers: int) -> int:
    """Write the random bf16 model (sharded safetensors + index), config and tokenizer; return parameters."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {**PHI3_MINI_4K, "num_hidden_layers": layers}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shapes = weight_shapes(config)
    groups: dict[int, list] = {}
    for name, shape in shapes:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else (0 if "embed" in name else 10**6)
        groups.setdefault(min(layer // LAYERS_PER_SHARD, 99), []).append((name, shape))
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for n, key in enumerate(sorted(groups), start=1):
        shard = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in groups[key]:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].numel()
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    build_tokenizer(directory)
    return total


def build_tokenizer(directory: Path) -> None:
    """A byte-fallback SentencePiece BPE trained on the example persona's text, plus Phi-3's added tokens."""
    import io

    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    dataset = Path(__file__).resolve().parent.parent / "examples" / "claudio" / "dataset.jsonl"
    lines = [m["content"] for row in dataset.read_text().splitlines() for m in json.loads(row)["messages"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=2000, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED])
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = PHI3_TEMPLATE
    tokenizer.save_pretrained(directory)


def timed(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``; wall seconds and peak RSS (MB) from its report."""
    full = ["/usr/bin/time", "-v", *command]
    with log.open("w") as out:
        done = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}); see {log}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": round(seconds, 1), "peak_rss_mb": round(rss_kb / 1024),
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def compare_f16(ours: Path, theirs: Path) -> dict:
    """Tensor-for-tensor comparison of two GGUF files (names, types, bytes)."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = [n for n in a if n in b and a[n].tensor_type == b[n].tensor_type and np.array_equal(a[n].data, b[n].data)]
    return {"tensors": len(a), "converter_tensors": len(b), "identical": len(same)}


def markdown(results: dict) -> str:
    """The results as the table of ``benchmarks/export_phi3.md``."""
    rows = [
        ("molting F16 writer", "molting_f16", "molting-f16_bytes"),
        ("llama.cpp convert_hf_to_gguf.py --outtype f16", "converter_f16", "converter-f16_bytes"),
        ("molting Q4_K_M (llama_model_quantize)", "molting_q4_k_m", "molting-Q4_K_M_bytes"),
    ]
    lines = ["| step | wall time | peak RSS | output bytes |", "|---|---|---|---|"]
    for label, key, size in rows:
        if key in results:
            lines.append(f"| {label} | {results[key]['wall_s']} s | {results[key]['peak_rss_mb']} MB | "
                         f"{results.get(size, 0):,} |")
    if "q4_k_m_vs_published" in results:
        lines.append(f"\nQ4_K_M vs the published {PUBLISHED_Q4_K_M_BYTES:,} bytes: "
                     f"{100 * results['q4_k_m_vs_published']:+.2f}%.")
    if "f16_comparison" in results:
        c = results["f16_comparison"]
        lines.append(f"F16 files: {c['identical']} of {c['tensors']} tensors identical to the converter's "
                     f"({c['converter_tensors']} there).")
    return "\n".join(lines) + "\n"


def step(name: str, args: list[str]) -> None:
    """The steps run in their own processes (so each one's peak RSS is its own)."""
    if name == "molting-f16":
        from molting.export import write_gguf

        write_gguf(args[0], args[1], outtype="f16")
    elif name == "molting-quantize":
        from molting.export import quantize

        quantize(args[0], args[1], "Q4_K_M", n_threads=int(args[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/phi3-bench"))
    parser.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/export_phi3.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the multi-GB files")
    parser.add_argument("--skip-quantize", action="store_true", help="F16 steps only (Q4_K_M took ~8 min here)")
    parser.add_argument("--layers", type=int, default=32, help="fewer for a quick smoke run (32 is Phi-3-mini)")
    args = parser.parse_args()
    work, model = args.work, args.work / "model"
    results: dict = {"threads": args.threads, "layers": args.layers, "load_average_before": os.getloadavg()}
    try:
        if not (model / "model.safetensors.index.json").is_file():
            results["parameters"] = build_model(model, args.layers)
        me = [sys.executable, __file__, "--step"]
        repo = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        results["molting_f16"] = timed([*me, "molting-f16", str(model), str(work / "molting-f16.gguf")],
                                       work / "molting-f16.log", env=repo)
        converter = [sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
                     "--outfile", str(work / "converter-f16.gguf")]
        results["converter_f16"] = timed(converter, work / "converter-f16.log",
                                         env={"PYTHONPATH": str(args.llama_cpp / "gguf-py")})
        results["f16_comparison"] = compare_f16(work / "molting-f16.gguf", work / "converter-f16.gguf")
        for name in ("molting-f16", "converter-f16"):
            results[f"{name}_bytes"] = (work / f"{name}.gguf").stat().st_size
        if not args.skip_quantize:
            results["molting_q4_k_m"] = timed(
                [*me, "molting-quantize", str(work / "molting-f16.gguf"), str(work / "molting-Q4_K_M.gguf"),
                 str(args.threads)], work / "molting-q4.log", env=repo)
            size = results["molting-Q4_K_M_bytes"] = (work / "molting-Q4_K_M.gguf").stat().st_size
            results["q4_k_m_vs_published"] = round(size / PUBLISHED_Q4_K_M_BYTES - 1, 5)
        results["load_average_after"] = os.getloadavg()
    finally:
        args.out.write_text(json.dumps(results, indent=2))
        args.out.with_suffix(".md").write_text(markdown(results))
        print(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--step":
        step(sys.argv[2], sys.argv[3:])
    else:
        main()
