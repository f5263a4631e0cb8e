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
   ``lora`` and system prompt): what the layer costs;
4. a negative control, ``--clients`` x min(``--requests``, 5) requests to llama-server directly with
   each persona's prompt on the *other* persona's adapter.

Every answer is matched against the references: "own" = the persona's prompt with its
adapter; "wrong persona" = any other pair's answer; "unmatched" = none (batched decoding
can differ from one-at-a-time decoding in the last bits, and greedy text with it). Each
unmatched answer is also given to the reference it shares the longest common prefix with
("nearest_own" / "nearest_wrong", "nearest_tie" when two share as much): a wrong persona's answer
starts as that persona's. The median characters an unmatched answer shares with its own reference is
reported too: a long shared start is batched decoding drifting, a short one says little.
Through the layer, each response's ``model`` must be the persona asked for.

The likelihood check does not need equal text: every answer's generated tokens (llama-server's
``return_tokens``) are scored after the prompt its request sent, under the base with each
adapter alone (``answer_loglikelihoods``, llama-cpp-python, one at a time), and the margin
"own adapter's log-likelihood minus the best other's" (nats) must be > 0; "wrong_adapter" counts
the answers where it is not. The control answers of step 4 must all be flagged, as must the one-at-a-time
references made with the other adapter; "swapped_labels" (every answer attributed to the other
persona) only checks that the labels reach the margins.

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
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
PERSONAS = {
    "claudio": ("Cláudio", "Você é o Cláudio, assistente da Softtor. Responda em português, com calma."),
    "marina": ("Marina", "You are Marina, a sailor from Lisbon. Answer in English, cheerfully."),
}
# llama-server's fields that add the generated token ids to an answer (its "__verbose" part): decoding is unchanged
TOKEN_IDS = {"return_tokens": True, "verbose": True}
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


class Answer(NamedTuple):
    """One answer of a load, with llama-server's counts and token ids."""

    latency: float  # seconds
    persona: int
    question: int
    completion_tokens: int
    text: str | None
    model: str  # the response's ``model`` field
    prompt_tokens: int
    token_ids: list[int] | None  # the generated tokens (``return_tokens``), end-of-generation included


def load(url: str, body_for, clients: int, requests: int) -> tuple[dict, list[Answer]]:
    """``clients`` threads, each with its own openai client, ``requests`` requests each; figures and answers."""
    import openai

    results: list[Answer] = []
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
            usage, text = reply.usage, reply.choices[0].message.content
            ids = (reply.model_extra or {}).get("__verbose", {}).get("tokens")  # asked for with return_tokens
            with lock:
                results.append(
                    Answer(elapsed, p, q, usage.completion_tokens, text, reply.model, usage.prompt_tokens, ids)
                )

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    latencies = sorted(r.latency for r in results)
    tokens = sum(r.completion_tokens for r in results)
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
    for _, p, q, _, text, model, *_ in results:
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


def answer_loglikelihoods(
    base: Path,
    adapters: list[Path],
    items: list[tuple[list[dict], str | list[int]]],
    threads: int = 1,
    n_ctx: int = 1024,
):
    """The log-likelihood of each answer after its prompt, under the base with each adapter alone.

    The prompt is rendered as ``LlamaCppBackend`` renders it (the GGUF's chat template with the
    generation prompt, special tokens parsed). An answer given as token ids is scored as given
    (llama-server's ids end with the end-of-generation token when it stopped on one). An answer
    given as text is tokenized on its own (no BOS, special tokens not parsed) and appended, as the
    engine generated it after the prompt's last token (tokenizing prompt + answer together could
    merge tokens across the seam, which generation never does); its text may tokenize otherwise
    than it was generated, and text decoded from invalid UTF-8 (U+FFFD) says little. Each adapter
    is loaded at scale 1 with no other; identical (prompt, answer) pairs are scored once.

    Args:
        base: the base model GGUF.
        adapters: A LoRA adapter GGUFs (llama.cpp's adapter format) for ``base``.
        items: N pairs (messages, answer): the chat messages exactly as the engine got them,
            system prompt included, and the answer as it came back: its text, or its token ids
            (llama-server's ``return_tokens`` gives them).
        threads: CPU threads of llama.cpp.
        n_ctx: context in tokens; every prompt + answer must fit.

    Returns:
        ``(logp, answer_tokens, prompt_tokens)``: ``logp`` float64 (N, A), the sum over the answer's
        tokens of log p(token | prompt, the answer before it) in nats, with adapter ``a`` in column
        ``a``; ``answer_tokens`` and ``prompt_tokens`` int (N,), the tokens scored and the prompt's.
    """
    import numpy as np

    from molting.backends.llamacpp import LlamaCppBackend

    class Scorer(LlamaCppBackend):  # the backend's checks and chat template, with logits at every position
        def _open(self, **params):
            return super()._open(logits_all=True, **params)

    keyed = [(json.dumps(messages, ensure_ascii=False), json.dumps(answer)) for messages, answer in items]
    keys = sorted(set(keyed))
    logp: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    lengths: dict[tuple[str, str], tuple[int, int]] = {}
    for adapter in adapters:
        scorer = Scorer(base, n_ctx=n_ctx, n_threads=threads, lora_path=adapter)
        try:
            prefilled = None
            for key in keys:  # sorted: the answers to one prompt follow one another, after one prefill
                prompt = scorer.prompt_tokens(json.loads(key[0]))
                answer = json.loads(key[1])
                if isinstance(answer, str):
                    answer = scorer.llm.tokenize(answer.encode("utf-8"), add_bos=False, special=False)
                if prefilled != key[0]:
                    scorer.llm.reset()
                    scorer.llm.eval(prompt)
                    prefilled = key[0]
                logp[key].append(_continuation_logprob(scorer.llm, len(prompt), answer))
                lengths[key] = (len(answer), len(prompt))
        finally:
            scorer.close()
    return (
        np.array([logp[key] for key in keyed], dtype=np.float64).reshape(len(items), len(adapters)),
        np.array([lengths[key][0] for key in keyed], dtype=int),
        np.array([lengths[key][1] for key in keyed], dtype=int),
    )


def _continuation_logprob(llm, n_prompt: int, answer: list[int]) -> float:
    """Sum of log p(answer token | all before it), nats, on a ``logits_all`` Llama whose first ``n_prompt``
    tokens are the prompt, already evaluated; what came after them is dropped first."""
    import numpy as np

    llm.n_tokens = n_prompt  # llama-cpp-python's eval removes the KV cells from here on
    llm.eval(answer)
    logits = llm.scores[n_prompt - 1 : n_prompt - 1 + len(answer)].astype(np.float64)  # (T, vocab)
    top = logits.max(axis=1)
    log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return float((logits[np.arange(len(answer)), answer] - log_norm).sum())


def adapter_margins(logp, own: list[int]):
    """Own adapter's log-likelihood minus the best other adapter's, nats, float (N,); > 0: own likelier.

    Args:
        logp: float (N, A) from :func:`answer_loglikelihoods`, A >= 2.
        own: N adapter indices, the one each answer should have been generated with.
    """
    import numpy as np

    rows = np.arange(len(own))
    others = logp.copy()
    others[rows, own] = -np.inf
    return logp[rows, own] - others.max(axis=1)


def margin_figures(margins, answer_tokens) -> dict:
    """How many margins are <= 0 ("wrong adapter": not likelier under its own), and their medians."""
    import numpy as np

    per_token = margins / np.maximum(answer_tokens, 1)
    return {
        "answers": len(margins),
        "wrong_adapter": int((margins <= 0).sum()),
        "margin_median_nats": float(np.median(margins)) if len(margins) else None,
        "margin_min_nats": float(margins.min()) if len(margins) else None,
        "margin_per_token_median_nats": float(np.median(per_token)) if len(margins) else None,
    }


def likelihood_check(results: list[Answer], prompts: dict, base: Path, adapters: list[Path], threads: int) -> dict:
    """Each answer of a load scored under every adapter, with the prompt its persona's request sent.

    An answer is scored by its generated token ids when it has them, else by its text.
    ``prompts[(p, q)]`` is the message list the engine got for persona ``p`` and question ``q``.
    "swapped_labels" attributes each answer to the next persona (that persona's adapter as "own",
    the prompt as sent): with two personas its margins are the others' negated, so it checks the
    labels reach the margins, no more; answers made with the wrong adapter for real are the
    control that matters (``wrong_adapter_load`` in the report).
    """
    labels = [r.persona for r in results]
    answers = [r.token_ids if r.token_ids is not None else r.text or "" for r in results]
    items = [(prompts[(r.persona, r.question)], answer) for r, answer in zip(results, answers, strict=True)]
    logp, answer_tokens, prompt_tokens = answer_loglikelihoods(base, adapters, items, threads)
    figures = margin_figures(adapter_margins(logp, labels), answer_tokens)
    swapped = [(p + 1) % len(adapters) for p in labels]
    figures["swapped_labels"] = margin_figures(adapter_margins(logp, swapped), answer_tokens)
    figures["scored_by_token_ids"] = sum(r.token_ids is not None for r in results)
    # the prompt rendered here has as many tokens as llama-server's (usage.prompt_tokens)
    figures["prompt_tokens_as_served"] = sum(
        int(t) == r.prompt_tokens for t, r in zip(prompt_tokens, results, strict=True)
    )
    return figures


def references_likelihood(answers: dict, prompts: dict, base: Path, adapters: list[Path], threads: int) -> dict:
    """The one-at-a-time greedy answers scored as :func:`likelihood_check` scores a load's (by their text).

    ``answers[(p, a, q)]`` is persona ``p``'s prompt on adapter ``a``: "own" when ``a == p``;
    otherwise an answer made with the wrong adapter, which the check must flag.
    """
    import numpy as np

    keys = sorted(answers)
    items = [(prompts[(p, q)], answers[(p, a, q)]) for p, a, q in keys]
    logp, answer_tokens, _ = answer_loglikelihoods(base, adapters, items, threads)
    margins = adapter_margins(logp, [p for p, _, _ in keys])
    own = np.array([p == a for p, a, _ in keys])
    return {
        "own_adapter": margin_figures(margins[own], answer_tokens[own]),
        "other_adapter": margin_figures(margins[~own], answer_tokens[~own]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine and of the backend")
    parser.add_argument("--adapters", type=Path, nargs=2, help="two adapter GGUFs for the embedded base")
    # 0.05 before 2026-12-06: too weak for the likelihood check to decide single answers (docs/serving.md)
    parser.add_argument("--std", type=float, default=0.2, help="std of the random adapters' B")
    parser.add_argument("--score-threads", type=int, default=1, help="CPU threads of the likelihood check")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    wrong_requests = min(args.requests, 5)  # per client, for the wrong-adapter control

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
                request = {"model": ids[p], "messages": ask, "max_tokens": args.max_tokens, "temperature": 0.0}
                return {**request, "extra_body": TOKEN_IDS}

            def raw_body(p: int, q: int) -> dict:
                routed = route(served.personas[ids[p]], len(adapters), body(p, q))
                lora = routed.pop("lora")  # not an openai argument
                return {**routed, "extra_body": {**TOKEN_IDS, "lora": lora}}

            def wrong_body(p: int, q: int) -> dict:  # the negative control: persona p's prompt, the next one's adapter
                other = route(served.personas[ids[(p + 1) % len(ids)]], len(adapters), body(p, q))
                return {**raw_body(p, q), "extra_body": {**TOKEN_IDS, "lora": other["lora"]}}

            through, through_results = load(f"http://127.0.0.1:{port}/v1", body, args.clients, args.requests)
            bypass, bypass_results = load(f"{engine.url}/v1", raw_body, args.clients, args.requests)
            wrong, wrong_results = load(f"{engine.url}/v1", wrong_body, args.clients, wrong_requests)
            server.should_exit = True
            thread.join()
            prompts = {(p, q): raw_body(p, q)["messages"] for p in range(len(ids)) for q in range(len(QUESTIONS))}
        # the engine is down: the likelihood check has the CPU to itself (the adapters live in tmp)
        threads = args.score_threads
        for figures, results in ((through, through_results), (bypass, bypass_results), (wrong, wrong_results)):
            figures["likelihood"] = likelihood_check(results, prompts, base, adapters, threads)
        scored_references = references_likelihood(answers, prompts, base, adapters, threads)
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
        "reference_answers_likelihood": scored_references,
        "wrong_adapter_load": {k: wrong[k] for k in ("requests", "errors", "likelihood")},
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    if importlib.util.find_spec("molting") is None:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
    main()
