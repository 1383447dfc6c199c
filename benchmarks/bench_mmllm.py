"""Instruction-tuning throughput: polymodal `MultimodalLM` (packed) vs transformers' LLaVA (padded).

Both models hold identical weights (ours copied into `LlavaForConditionalGeneration` by name:
`model.vision_tower.*`, `model.multi_modal_projector.linear_1/linear_2`,
`model.language_model.*`, `lm_head`) and train on the same shapes-world visual chats with the
loss on the assistant answers only. transformers gets each step's chats right-padded to the
longest one (the usual LLaVA collator); polymodal packs them padding-free into rows. The
logits of both models are compared first (and the first losses reported), so the timing
compares equal work. polymodal runs as its recipes do, with the LM head on the answer positions
only (`polymodal.train.objectives.next_token_loss`); "polymodal_all_logits" is the same packed step with logits everywhere,
to show what that saves. Reported: real (non-padding) tokens/s of a full training step (forward,
backward, AdamW), median and best of interleaved rounds, the ratio, and MFU on CUDA (model FLOPs
with the head on every position, the same count for every variant).

Usage: python benchmarks/bench_mmllm.py [--quick] [--device cuda] [--peak-tflops 989] [--vocab 49152] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench_lm import _rates, _ratios, _train_step, hf_name
from common import causal_pairs, machine_info, matmul_params, mfu, save_json, time_interleaved, train_flops
from polymodal.backbones.decoder import DecoderConfig
from polymodal.data.conversation import ImageProcessor, conversation_document
from polymodal.encoders.vit import ViTConfig
from polymodal.interop.hf_vit import vit_state_to_hf
from polymodal.models.mmllm import MMLLMConfig, MultimodalLM
from polymodal.projectors import ProjectorConfig
from polymodal.sequence import IGNORE_INDEX, NEXT_TOKEN, pack_documents
from polymodal.train.objectives import next_token_loss, token_cross_entropy


def bench_config(vocab_size: int, image_token_id: int, quick: bool = False) -> MMLLMConfig:
    """A CLIP-layout ViT (64 px, 8 px patches -> 64 image tokens) + LLaVA-1.5 MLP + a Llama LM."""
    if quick:
        vision = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
        lm = DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=1024)
    else:
        vision = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_layers=4, num_heads=4, intermediate_size=768)
        lm = DecoderConfig(vocab_size=vocab_size, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                           num_kv_heads=2, max_position_embeddings=2048)
    return MMLLMConfig(vision=vision, lm=lm, projector=ProjectorConfig(kind="mlp"), image_token_id=image_token_id)


def to_hf_llava(model: MultimodalLM):
    """A transformers LlavaForConditionalGeneration (SDPA) holding a copy of `model`'s weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    c, v, t = model.config, model.config.vision, model.config.lm
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                              patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.norm_eps)
    text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                       head_dim=t.resolved_head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                       max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings,
                       pad_token_id=0, bos_token_id=None, eos_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=c.image_token_id,
                         image_seq_length=model.image_tokens, vision_feature_layer=c.vision_feature_layer,
                         vision_feature_select_strategy="default" if c.drop_class_token else "full",
                         projector_hidden_act="gelu", attn_implementation="sdpa")
    hf = LlavaForConditionalGeneration(config)
    state = {}
    for name, tensor in vit_state_to_hf(model.vision.state_dict()).items():
        state["model.vision_tower." + name.removeprefix("vision_model.")] = tensor
    state["model.multi_modal_projector.linear_1.weight"] = model.projector.layers[0].weight
    state["model.multi_modal_projector.linear_1.bias"] = model.projector.layers[0].bias
    state["model.multi_modal_projector.linear_2.weight"] = model.projector.layers[2].weight
    state["model.multi_modal_projector.linear_2.bias"] = model.projector.layers[2].bias
    for name, tensor in model.lm.state_dict().items():
        key = hf_name(name)
        state[key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")] = tensor
    hf.load_state_dict(state, strict=True)
    return hf.to(next(model.parameters()).device)


def world_chats(num: int, tokenizer, config: MMLLMConfig, image_tokens: int, max_turns: int, seed: int = 0):
    """`num` shapes-world visual chats as Documents (loss on answers), of 1..max_turns turns each.

    Instruction-tuning mixes vary in length (LLaVA-Instruct mixes one-line VQA with long
    conversations and detailed descriptions); the turn count is drawn uniformly per chat.
    """
    from polymodal.data.world import World

    world = World("train", image_size=config.vision.image_size, num_objects=(1, 4), seed=seed)
    processor = ImageProcessor.for_model(config)
    turns = torch.randint(1, max_turns + 1, (num,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [conversation_document(tokenizer, s.conversation(t), [processor(s.image())], config.image_token_id,
                                  image_tokens) for s, t in zip(world.scenes(num), turns)]


def padded_batch(docs, device: str) -> dict:
    """HF LLaVA inputs: right-padded ids, mask, unshifted labels (-100 off the answers), pixels."""
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, doc in enumerate(docs):
        row = torch.cat([s.tokens for s in doc.segments])
        target = torch.cat([torch.full((s.length,), s.target == NEXT_TOKEN) for s in doc.segments])
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, :len(row)] = row.masked_fill(~target, IGNORE_INDEX)
    pixels = torch.stack([s.data for d in docs for s in d.segments if s.modality == "image"])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device)}


def run(quick: bool = False, device: str = "cpu", docs_per_step: int = 24, max_turns: int = 10, max_tokens: int = 8192,
        warmup: int = 1, iters: int = 5, seed: int = 0, peak_tflops: float | None = None,
        vocab_size: int | None = None) -> dict:
    """Time polymodal packed vs transformers padded instruction-tuning steps; returns a result dict.

    vocab_size: LM vocabulary (default: the world tokenizer's 517); a larger one (49,152 is
    SmolLM2's) adds head rows the chats never use but every logit pays for."""
    from polymodal.data.world import world_tokenizer

    tokenizer = world_tokenizer()
    config = bench_config(max(vocab_size or 0, tokenizer.vocab_size), tokenizer.token_to_id("<image>"), quick)
    torch.manual_seed(seed)
    ours = MultimodalLM(config).to(device)
    hf = to_hf_llava(ours)
    docs = world_chats(docs_per_step, tokenizer, config, ours.image_tokens, max_turns, seed)
    packed = pack_documents(docs, max_tokens).to(device)
    padded = padded_batch(docs, device)
    with torch.no_grad():  # equal weights, equal inputs -> equal logits
        one = padded_batch(docs[:1], device)
        diff = (ours(one["input_ids"], one["pixel_values"]).logits
                - hf(input_ids=one["input_ids"], pixel_values=one["pixel_values"]).logits).abs().max().item()
    if not diff < 1e-3:
        raise RuntimeError(f"polymodal and transformers LLaVA logits differ by {diff:.3g}: the weight copy is wrong")
    steps, losses = {}, {}
    steps["transformers_padded"], losses["transformers_padded"] = _train_step(hf, lambda: hf(**padded).loss, device)
    steps["polymodal_packed"], losses["polymodal_packed"] = _train_step(
        ours, lambda: next_token_loss(ours, packed), device)
    steps["polymodal_all_logits"], losses["polymodal_all_logits"] = _train_step(
        ours, lambda: token_cross_entropy(ours(packed=packed).logits, packed.labels), device)
    times = time_interleaved(steps, warmup, iters, device)
    real = sum(len(d) for d in docs)
    padded_positions = padded["input_ids"].numel()
    result = {"machine": machine_info(device), "logits_max_diff": diff, "documents": len(docs),
              "padding_fraction": 1 - sum(len(d) for d in docs) / padded_positions,
              "image_tokens": ours.image_tokens, "real_tokens_per_step": real,
              "padded_shape": list(padded["input_ids"].shape), "packed_shape": list(packed.token_ids.shape),
              "first_loss": {k: float(v[0]) for k, v in losses.items()},
              "parameters": sum(p.numel() for p in ours.parameters())}
    flops = train_flops(matmul_params(ours.lm, ours.lm.embed_tokens), real,
                        causal_pairs([len(d) for d in docs]), config.lm.num_layers,
                        config.lm.num_heads * config.lm.resolved_head_dim)
    flops += 6.0 * matmul_params(ours.vision) * len(padded["pixel_values"]) * (config.vision.grid ** 2 + 1)
    flops += 6.0 * matmul_params(ours.projector) * len(padded["pixel_values"]) * ours.image_tokens
    for name, timing in times.items():
        result[name] = _rates(timing, real, "real_tokens")
        if peak_tflops:
            result[name]["mfu"] = mfu(flops / timing.median, peak_tflops)
    result["ratio_packed_vs_hf_padded"] = _ratios(result, "real_tokens", "polymodal_packed", "transformers_padded")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry: print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=int, default=24, help="chats per training step")
    parser.add_argument("--max-turns", type=int, default=10, help="chats have 1..max-turns question turns")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="packed row length (default: the whole step in one row, as the quickstart packs)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)")
    parser.add_argument("--vocab", type=int, default=None, help="LM vocabulary size (e.g. 49152, SmolLM2's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args.quick, args.device, docs_per_step=args.docs, max_turns=args.max_turns, max_tokens=args.max_tokens,
                 iters=args.iters, warmup=0 if args.quick else 1,
                 peak_tflops=args.peak_tflops, vocab_size=args.vocab)
    ratio = result["ratio_packed_vs_hf_padded"]
    print(f"{result['documents']} chats/step, {result['real_tokens_per_step']} real tokens; padded "
          f"{result['padded_shape']} ({100 * result['padding_fraction']:.0f}% padding) vs packed "
          f"{result['packed_shape']}; logits max diff {result['logits_max_diff']:.2e}")
    for name in ("transformers_padded", "polymodal_packed", "polymodal_all_logits"):
        r = result[name]
        extra = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(f"  {name:<20} {r['real_tokens_per_s']:9.0f} tok/s (best {r['real_tokens_per_s_best']:.0f}){extra}")
    print(f"  ratio packed / HF padded: {ratio}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
