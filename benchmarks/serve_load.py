"""Loopback load on ``molting serve``: concurrent openai clients, two personas on one base, checked answers.

Two personas share the embedded SmolLM2-135M GGUF, each with its own LoRA adapter GGUF
(random adapters made here, r=8, unless ``--adapters`` names two) and its own system
prompt. One process starts one llama-server with both adapters and molting's thin layer,
both on 127.0.0.1, then measures, in this order and in the same run:

1. ``LlamaCppBackend`` directly, one request after another: the reference answers (greedy) of
   every (system prompt, adapter) pair for each question, and its decode tokens/s;
2. the server with ``--clients`` concurrent openai clients x ``--requests`` requests each,
   alternating the personas: errors, p50/p95 latency, total completion tokens/s;
3. the same load sent to llama-server directly (bypassing the thin layer, the same
   ``lora`` and system prompt): what the layer costs.

Every answer is matched against the references: "own" = the persona's prompt with its
adapter; "wrong persona" = any other pair's answer; "unmatched" = none (batched decoding
can differ from one-at-a-time decoding in the last bits, and greedy text with it). Each
unmatched answer is also given to the reference it shares the longest common prefix with
("nearest_own" / "nearest_wrong", "nearest_tie" when two share as much): a wrong persona's answer
starts as that persona's. The median characters an unmatched answer shares with its own reference is
reported too: a long shared start is batched decoding drifting, a short one says little.
Through the layer, each response's ``model`` must be the persona asked for.

    flock /tmp/molting-heavy.lock nice -n 5 python benchmarks/serve_load.py --threads 2

Prints JSON; ``--out FILE`` also writes it. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PERSONAS = {
    "claudio": ("Cláudio", "Você é o Cláudio, assistente da Softtor. Responda em português, com calma."),
    "marina": ("Marina", "You are Marina, a sailor from Lisbon. Answer in English, cheerfully."),
}
QUESTIONS = [  # asking for long answers, so that most of them run to --max-tokens
    "Tell me a long story about the sea and a lighthouse.",
    "Explain step by step how bread is made, in detail.",
    "Conte uma história longa sobre um gato e a cidade.",
    "Describe your whole day, from morning to night.",
]


def random_adapter(base_dir: Path, out: Path, seed: int, std: float) -> Path:
    """A peft LoRA adapter (r=8 on q/k/v/o) with B ~ N(0, std): a stand-in for a trained persona."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


def make_personas(root: Path, adapters: list[Path] | None, std: float) -> tuple[list, list[Path], Path]:
    """Persona objects, their adapter GGUFs and the base GGUF (the embedded model's)."""
    from molting.export import write_lora_gguf
    from molting.models import embedded_gguf, resolve_base_model
    from molting.persona import Persona

    personas = [
        Persona(name, "pt", [name], ["curioso"], prompt, prompt, root=root) for name, prompt in PERSONAS.values()
    ]
    if adapters is None:
        base_dir = resolve_base_model("smollm2-135m")
        adapters = [
            write_lora_gguf(random_adapter(base_dir, root / f"{slug}-adapter", i, std), base_dir, root / f"{slug}.gguf")
            for i, slug in enumerate(PERSONAS)
        ]
    return personas, adapters, embedded_gguf("smollm2-135m")


def references(personas, adapters, base: Path, max_tokens: int, threads: int) -> tuple[dict, dict]:
    """Greedy answers of every (prompt persona, adapter persona, question), and the backend's figures."""
    from molting.backends import GenerationConfig
    from molting.backends.llamacpp import LlamaCppBackend

    config = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0)
    answers, tokens, seconds = {}, 0, 0.0
    for a, adapter in enumerate(adapters):
        backend = LlamaCppBackend(base, n_ctx=2048, n_threads=threads, lora_path=adapter)
        for p, persona in enumerate(personas):
            for q, question in enumerate(QUESTIONS):
                start = time.perf_counter()
                response = backend.generate(persona.messages(question), config)
                seconds += time.perf_counter() - start
                tokens += response.completion_tokens
                answers[(p, a, q)] = response.text
        backend.close()
    return answers, {"requests": len(answers), "completion_tokens": tokens, "tokens_per_s": tokens / seconds}


def load(url: str, body_for, clients: int, requests: int) -> tuple[dict, list]:
    """``clients`` threads, each with its own openai client, ``requests`` requests each; figures and answers."""
    import openai

    results: list[tuple[float, int, int, int, str | None, str]] = []  # latency, persona, question, tokens, text, model
    errors: list[str] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        for i in range(requests):
            p, q = (c + i) % len(PERSONAS), (c * requests + i) % len(QUESTIONS)
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(**body_for(p, q))
            except openai.OpenAIError as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            with lock:
                text = reply.choices[0].message.content
                results.append((elapsed, p, q, reply.usage.completion_tokens, text, reply.model))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[3] for r in results)
    figures = {
        "requests": clients * requests,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }
    return figures, results


def _common_prefix(a: str, b: str) -> int:
    """Characters ``a`` and ``b`` share from their start."""
    return len(os.path.commonprefix([a, b]))


def check(results, answers: dict, ids: list[str] | None = None) -> dict:
    """Count answers equal to their own persona's reference, to another pair's, or to none.

    Unmatched answers are also counted by the reference they share the longest prefix with.
    With ``ids``, answers whose ``model`` is not the persona asked for are counted.
    """
    counts = {"own": 0, "wrong_persona": 0, "unmatched": 0, "nearest_own": 0, "nearest_wrong": 0, "nearest_tie": 0}
    shared = []  # characters each unmatched answer shares with the start of its own reference
    if ids is not None:
        counts["model_field_wrong"] = 0
    for _, p, q, _, text, model in results:
        text = (text or "").strip()
        if ids is not None and model != ids[p]:
            counts["model_field_wrong"] += 1
        if text == answers[(p, p, q)]:
            counts["own"] += 1
            continue
        if any(text == answers[key] for key in answers if key[2] == q):
            counts["wrong_persona"] += 1
            continue
        counts["unmatched"] += 1
        others = max(_common_prefix(text, answers[key]) for key in answers if key[2] == q and key != (p, p, q))
        own = _common_prefix(text, answers[(p, p, q)])
        counts["nearest_own" if own > others else "nearest_wrong" if others > own else "nearest_tie"] += 1
        shared.append(own)
    if shared:
        counts["unmatched_common_prefix_chars_median"] = statistics.median(shared)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine and of the backend")
    parser.add_argument("--adapters", type=Path, nargs=2, help="two adapter GGUFs for the embedded base")
    parser.add_argument("--std", type=float, default=0.05, help="std of the random adapters' B")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import uvicorn

    from molting.serve import EngineOptions, LlamaServer, plan
    from molting.serve.app import create_app, route
    from molting.serve.llama_server import free_port

    with tempfile.TemporaryDirectory() as tmp:
        personas, adapters, base = make_personas(Path(tmp), args.adapters, args.std)
        answers, direct = references(personas, adapters, base, args.max_tokens, args.threads)
        served = plan(personas, adapters, base)
        options = EngineOptions(n_ctx=2048, parallel=args.clients, n_threads=args.threads)
        with LlamaServer(served.engines[0], options, Path(tmp) / "engine.log") as engine:
            port = free_port()
            server = uvicorn.Server(
                uvicorn.Config(create_app(served, [engine.url]), host="127.0.0.1", port=port, log_level="warning")
            )
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                time.sleep(0.05)
            ids = list(served.personas)

            def body(p: int, q: int) -> dict:
                ask = [{"role": "user", "content": QUESTIONS[q]}]
                return {"model": ids[p], "messages": ask, "max_tokens": args.max_tokens, "temperature": 0.0}

            def raw_body(p: int, q: int) -> dict:
                routed = route(served.personas[ids[p]], len(adapters), body(p, q))
                lora = routed.pop("lora")  # not an openai argument
                return {**routed, "extra_body": {"lora": lora}}

            through, through_results = load(f"http://127.0.0.1:{port}/v1", body, args.clients, args.requests)
            bypass, bypass_results = load(f"{engine.url}/v1", raw_body, args.clients, args.requests)
            server.should_exit = True
            thread.join()
    through["answers"], bypass["answers"] = check(through_results, answers, ids), check(bypass_results, answers)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": f"{args.clients} clients x {args.requests} requests, {args.max_tokens} max tokens, 2 personas",
        "threads": args.threads,
        "llamacpp_backend_sequential": direct,
        "molting_serve": through,
        "llama_server_direct": bypass,
        "server_vs_backend_tokens_per_s": through["tokens_per_s"] / direct["tokens_per_s"],
        "layer_vs_llama_server_tokens_per_s": through["tokens_per_s"] / bypass["tokens_per_s"],
        "distinct_reference_answers": len(set(answers.values())),
        "reference_answers": len(answers),
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    if importlib.util.find_spec("molting") is None:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
    main()
