"""Core LM benchmarks: polymodal `DecoderLM` against transformers' `LlamaForCausalLM`.

Both models run in one process with identical weights (ours copied into HF's by name), on the
same inputs, timed interleaved (see `common.time_interleaved`). Three sections:

1. train:  forward + backward + AdamW step on one (B, T) batch, no padding (equal work).
2. packed: documents of a realistic length spread; HF pads each batch to its longest document,
           polymodal packs them into rows (`pack_documents`). Real (non-pad) tokens/s for HF
           padded, polymodal padded (same batch as HF) and polymodal packed.
3. decode: greedy KV-cached generation of exactly N new tokens, batch 1 and batch 8 (ragged
           prompts, left padding).

Usage: python benchmarks/bench_lm.py [--quick] [--device cuda] [--peak-tflops 989] [--json out.json]
On CUDA, training runs under bf16 autocast and decoding with bf16 weights, and the training
sections report MFU; on CPU everything is fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
from common import (
    Timing,
    causal_pairs,
    machine_info,
    matmul_params,
    mfu,
    save_json,
    time_interleaved,
    train_flops,
)

from polymodal.backbones.decoder import DecoderConfig, DecoderLM, shift_labels
from polymodal.infer.generate import generate, left_pad
from polymodal.sequence import IGNORE_INDEX, Document, pack_documents
from polymodal.train.objectives import next_token_loss, token_cross_entropy


@dataclass
class BenchSizes:
    """Workload sizes. train_*: section 1 batch; docs_*: section 2 documents per step and their
    length range; decode_*: section 3 new tokens and prompt lengths (batch 1 uses the first)."""

    train_batch: int = 8
    train_seq: int = 256
    docs_per_step: int = 16
    doc_min_len: int = 20
    doc_max_len: int = 500
    pack_max_tokens: int = 512
    decode_new_tokens: int = 64
    decode_prompt_lens: tuple[int, ...] = (32, 9, 57, 20, 64, 13, 41, 28)
    warmup: int = 2
    iters: int = 7


FULL = BenchSizes()
QUICK = BenchSizes(train_batch=4, train_seq=128, docs_per_step=8, doc_max_len=250, pack_max_tokens=256,
                   decode_new_tokens=16, warmup=1, iters=3)


def bench_config() -> DecoderConfig:
    """The benchmarked layout: Llama-style, GQA 6q/2kv heads, ~15.7M parameters, untied head."""
    return DecoderConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                         num_kv_heads=2, max_position_embeddings=2048)


def hf_name(name: str) -> str:
    """Our state-dict key -> the LlamaForCausalLM key holding the same tensor."""
    if name.startswith("layers.layers."):
        name = "model.layers." + name[len("layers.layers."):]
        return (name.replace(".attn.", ".self_attn.").replace(".attn_norm.", ".input_layernorm.")
                .replace(".mlp_norm.", ".post_attention_layernorm."))
    if name.startswith(("embed_tokens.", "norm.")):
        return "model." + name
    return name


def to_hf_llama(model: DecoderLM):
    """A transformers LlamaForCausalLM (SDPA attention) with a copy of `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.resolved_head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, bos_token_id=None, eos_token_id=None,
        pad_token_id=0, attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_config)
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.to(next(model.parameters()).device)


def build_pair(config: DecoderConfig, device: str, seed: int = 0) -> tuple[DecoderLM, torch.nn.Module]:
    """Our model (seeded init) and an HF Llama holding identical weights, both on `device`."""
    torch.manual_seed(seed)
    ours = DecoderLM(config).to(device)
    return ours, to_hf_llama(ours)


@torch.no_grad()
def logits_max_diff(ours: DecoderLM, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    """Largest |logit difference| of the two models on ids (B, T); raises if they disagree."""
    diff = (ours(ids).logits - hf(input_ids=ids).logits).abs().max().item()
    if not diff < 1e-3:
        raise RuntimeError(f"polymodal and transformers logits differ by {diff:.3g}: the weight copy is wrong")
    return diff


def _autocast(device: str):
    """bf16 autocast on CUDA (the usual mixed-precision training setup); fp32 on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(model: torch.nn.Module, loss_fn, device: str, lr: float = 1e-4):
    """A zero-argument training step (forward loss, backward, AdamW) and a list of its losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses: list[float] = []

    def step():
        """zero_grad, forward loss (autocast on CUDA), backward, AdamW step."""
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    return step, losses


def _rates(timing: Timing, work: int, unit: str) -> dict:
    """Median and best seconds per call and the matching `unit`/s for `work` units per call."""
    return {"call_s": timing.median, "call_s_best": timing.best, "samples_s": timing.samples,
            "cpu_s": timing.cpu_median,
            f"{unit}_per_s": work / timing.median, f"{unit}_per_s_best": work / timing.best}


def _ratios(result: dict, unit: str, a: str, b: str) -> dict:
    """result[a] / result[b] throughput, from the medians and from the best rounds."""
    return {"median": result[a][f"{unit}_per_s"] / result[b][f"{unit}_per_s"],
            "best": result[a][f"{unit}_per_s_best"] / result[b][f"{unit}_per_s_best"]}


def _attn_width(config: DecoderConfig) -> int:
    return config.num_heads * config.resolved_head_dim


def _flops_report(ours: DecoderLM, tokens_per_s: float, tokens: int, pairs: int, peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s (useful model FLOPs only) and MFU when a peak is given."""
    c = ours.config
    per_step = train_flops(matmul_params(ours, ours.embed_tokens), tokens, pairs, c.num_layers, _attn_width(c))
    achieved = per_step * tokens_per_s / tokens
    out = {"tflops": achieved / 1e12}
    if peak_tflops:
        out["mfu"] = mfu(achieved, peak_tflops)
    return out


def bench_train(config: DecoderConfig, sizes: BenchSizes, device: str = "cpu", seed: int = 0,
                peak_tflops: float | None = None) -> dict:
    """Section 1: training tokens/s of both models on one (B, T) batch with no padding."""
    ours, hf = build_pair(config, device, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (sizes.train_batch, sizes.train_seq), generator=gen).to(device)
    diff = logits_max_diff(ours, hf, ids)
    labels = shift_labels(ids)
    ours_step, ours_losses = _train_step(ours, lambda: token_cross_entropy(ours(ids).logits, labels), device)
    hf_step, hf_losses = _train_step(hf, lambda: hf(input_ids=ids, labels=ids).loss, device)
    times = time_interleaved({"polymodal": ours_step, "transformers": hf_step}, sizes.warmup, sizes.iters, device)
    tokens = ids.numel()
    result = {"batch": list(ids.shape), "tokens_per_step": tokens, "logits_max_abs_diff": diff,
              "first_loss": {"polymodal": float(ours_losses[0]), "transformers": float(hf_losses[0])}}
    pairs = sizes.train_batch * causal_pairs([sizes.train_seq])
    for name, timing in times.items():
        result[name] = _rates(timing, tokens, "tokens")
        result[name].update(_flops_report(ours, tokens / timing.median, tokens, pairs, peak_tflops))
    result["ratio"] = _ratios(result, "tokens", "polymodal", "transformers")
    return result


def make_documents(num_docs: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Random token documents with lognormal lengths clipped to [min_len, max_len].

    The median sits at a quarter of max_len with a long tail, like instruction/chat data where
    most samples are short and a few run long.
    """
    gen = torch.Generator().manual_seed(seed)
    mu, sigma = math.log(max_len / 4), 0.8
    lengths = (torch.randn(num_docs, generator=gen) * sigma + mu).exp().round().clamp(min_len, max_len).long()
    return [torch.randint(0, vocab_size, (int(n),), generator=gen) for n in lengths]


def pad_right(docs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents -> (ids (B, T_max), mask (B, T_max)) padded on the right to the longest, mask 1 = real."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = d
        mask[i, :len(d)] = 1
    return ids, mask


def bench_packed(config: DecoderConfig, sizes: BenchSizes, device: str = "cpu", seed: int = 0,
                 peak_tflops: float | None = None) -> dict:
    """Section 2: real tokens/s of HF padded, polymodal padded and polymodal packed training.

    All three see the same documents each step and compute the same loss (mean next-token
    cross-entropy over real targets), which is checked on the first step.
    """
    docs = make_documents(sizes.docs_per_step, sizes.doc_min_len, sizes.doc_max_len, config.vocab_size, seed)
    ids, mask = pad_right(docs)
    ids, mask = ids.to(device), mask.to(device)
    hf_labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # HF shifts labels itself
    ours_labels = shift_labels(ids, mask)
    packed = pack_documents([Document.from_tokens(d) for d in docs], max_tokens=sizes.pack_max_tokens).to(device)

    ours_pad, hf = build_pair(config, device, seed)
    ours_pack, _ = build_pair(config, device, seed)
    steps, losses = {}, {}
    steps["transformers_padded"], losses["transformers_padded"] = _train_step(
        hf, lambda: hf(input_ids=ids, attention_mask=mask, labels=hf_labels).loss, device)
    steps["polymodal_padded"], losses["polymodal_padded"] = _train_step(
        ours_pad, lambda: token_cross_entropy(ours_pad(ids, attention_mask=mask).logits, ours_labels), device)
    steps["polymodal_packed"], losses["polymodal_packed"] = _train_step(
        ours_pack, lambda: next_token_loss(ours_pack, packed), device)
    times = time_interleaved(steps, sizes.warmup, sizes.iters, device)

    real = sum(len(d) for d in docs)
    pairs = causal_pairs([len(d) for d in docs])
    result = {"documents": len(docs), "real_tokens_per_step": real,
              "doc_len_min_median_max": [min(len(d) for d in docs), sorted(len(d) for d in docs)[len(docs) // 2],
                                         max(len(d) for d in docs)],
              "padded_shape": list(ids.shape), "packed_shape": list(packed.token_ids.shape),
              "first_loss": {name: float(v[0]) for name, v in losses.items()}}
    for name, timing in times.items():
        result[name] = _rates(timing, real, "real_tokens")
        result[name].update(_flops_report(ours_pad, real / timing.median, real, pairs, peak_tflops))
    result["ratio_packed_vs_hf_padded"] = _ratios(result, "real_tokens", "polymodal_packed", "transformers_padded")
    result["ratio_padded_vs_hf_padded"] = _ratios(result, "real_tokens", "polymodal_padded", "transformers_padded")
    result["ratio_packed_vs_own_padded"] = _ratios(result, "real_tokens", "polymodal_packed", "polymodal_padded")
    return result


def bench_decode(config: DecoderConfig, sizes: BenchSizes, batch_size: int, device: str = "cpu",
                 seed: int = 0) -> dict:
    """Section 3: greedy KV-cached decoding of exactly N new tokens per row (no eos), both models.

    Tokens/s counts generated tokens (B * N) over the whole call, prefill included.
    """
    if batch_size > len(sizes.decode_prompt_lens):
        raise ValueError(f"batch_size {batch_size} > len(decode_prompt_lens) {len(sizes.decode_prompt_lens)}")
    ours, hf = build_pair(config, device, seed)
    if torch.device(device).type == "cuda":
        ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)  # inference runs in bf16 weights
    ours.eval()
    hf.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
               for n in sizes.decode_prompt_lens[:batch_size]]
    n_new = sizes.decode_new_tokens
    hf_ids, hf_mask = (t.to(device) for t in left_pad(prompts))
    outputs = {}

    def run_ours():
        """One polymodal generate call; keeps its tokens for the equality check."""
        outputs["polymodal"] = generate(ours, prompts, max_new_tokens=n_new)

    def run_hf():
        """One transformers generate call; keeps its new tokens (prompt columns dropped)."""
        out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=False, max_new_tokens=n_new,
                          min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        outputs["transformers"] = out[:, hf_ids.shape[1]:].tolist()

    times = time_interleaved({"polymodal": run_ours, "transformers": run_hf}, sizes.warmup, sizes.iters, device)
    for name, rows in outputs.items():
        if any(len(r) != n_new for r in rows):
            raise RuntimeError(f"{name} generated {[len(r) for r in rows]} tokens per row, expected {n_new}")
    same = sum(a == b for ra, rb in zip(outputs["polymodal"], outputs["transformers"]) for a, b in zip(ra, rb))
    result = {"batch": batch_size, "prompt_lens": [len(p) for p in prompts], "new_tokens": n_new,
              "greedy_tokens_equal_fraction": same / (batch_size * n_new)}
    for name, timing in times.items():
        result[name] = _rates(timing, batch_size * n_new, "tokens")
    result["ratio"] = _ratios(result, "tokens", "polymodal", "transformers")
    return result


def run_all(config: DecoderConfig, sizes: BenchSizes, device: str = "cpu", seed: int = 0,
            peak_tflops: float | None = None) -> dict:
    """Every section on one config; returns the JSON-ready results."""
    n_params = sum(p.numel() for p in DecoderLM(config).parameters())
    return {
        "config": asdict(config), "params": n_params, "sizes": asdict(sizes), "machine": machine_info(device),
        "train": bench_train(config, sizes, device, seed, peak_tflops),
        "packed": bench_packed(config, sizes, device, seed, peak_tflops),
        "decode_b1": bench_decode(config, sizes, 1, device, seed),
        "decode_b8": bench_decode(config, sizes, min(8, len(sizes.decode_prompt_lens)), device, seed),
    }


def format_table(results: dict) -> str:
    """A plain-text table: median throughputs and polymodal / transformers ratios (median, best)."""
    def row(label, ours, theirs, unit, ratio, fmt=".0f"):
        """One table row: label, both throughputs, median and best ratios."""
        return (label, format(ours[unit], fmt), format(theirs[unit], fmt), f"{ratio['median']:.2f}x",
                f"{ratio['best']:.2f}x")

    rows = [("benchmark (tokens/s, median)", "polymodal", "transformers", "ratio", "ratio(best)")]
    t, p = results["train"], results["packed"]
    rows.append(row(f"train  B,T={t['batch']}", t["polymodal"], t["transformers"], "tokens_per_s", t["ratio"]))
    hf = p["transformers_padded"]
    rows.append(row(f"train padded {p['padded_shape']} (real tok)", p["polymodal_padded"], hf, "real_tokens_per_s",
                    p["ratio_padded_vs_hf_padded"]))
    rows.append(row(f"train ours packed {p['packed_shape']} vs HF padded", p["polymodal_packed"], hf,
                    "real_tokens_per_s", p["ratio_packed_vs_hf_padded"]))
    for key in ("decode_b1", "decode_b8"):
        d = results[key]
        rows.append(row(f"decode B={d['batch']} N={d['new_tokens']}", d["polymodal"], d["transformers"],
                        "tokens_per_s", d["ratio"], ".1f"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    own = p["ratio_packed_vs_own_padded"]
    extra = [(f"packing win over own padding: {own['median']:.2f}x (best {own['best']:.2f}x); {p['documents']} docs, "
              f"{p['real_tokens_per_step']} real tokens/step, lengths min/median/max {p['doc_len_min_median_max']}"),
             (f"logits max |diff| {t['logits_max_abs_diff']:.2e}; first-step losses: train {t['first_loss']}, "
              f"packed/padded {p['first_loss']}"),
             (f"greedy tokens equal: B=1 {results['decode_b1']['greedy_tokens_equal_fraction']:.2f}, "
              f"B=8 {results['decode_b8']['greedy_tokens_equal_fraction']:.2f}")]
    if "mfu" in t["polymodal"]:
        extra.append(f"MFU train: polymodal {t['polymodal']['mfu']:.1%}, transformers {t['transformers']['mfu']:.1%}; "
                     f"packed {p['polymodal_packed']['mfu']:.1%}, HF padded {hf['mfu']:.1%}")
    return "\n".join(lines + [""] + extra)


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run every section, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few iterations (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 autocast + MFU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak TFLOP/s for MFU (default: H100 bf16 dense)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: left at torch's default); 1 is steadier on a busy host")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sizes = QUICK if args.quick else FULL
    peak = args.peak_tflops if torch.device(args.device).type == "cuda" else None
    results = run_all(bench_config(), sizes, args.device, args.seed, peak)
    results["command"] = " ".join(["python"] + sys.argv)
    results["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    print(f"polymodal DecoderLM vs transformers LlamaForCausalLM  ({results['params'] / 1e6:.1f}M params, "
          f"{args.device}, {results['machine']['threads']} threads)")
    print(format_table(results))
    save_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
