"""Benchmark: unified-model training, polymodal packed vs transformers' Chameleon padded.

The same LM weights on both sides: a `ChameleonForConditionalGeneration` is built from a small
random `ChameleonConfig` (QK-norm, image codes inside the vocabulary) and its LM is imported into
our `DecoderLM` with `polymodal.interop.hf_chameleon_lm`; logits are checked to agree first.
The same documents every step: world documents of the `unified` recipe (caption -> image,
image -> caption, image -> answer, text only; 64 px images as 8 x 8 codes with row ends), drawn
by `polymodal.recipes.unified.WorldDocuments` with a random image tokenizer (the token counts
are what matter). polymodal packs them padding-free (`pack_documents`) and scores only the
target positions (`sequence_loss`); transformers gets them padded to the longest document with
an attention mask. Its `forward` sets every image-token logit to the dtype minimum (Chameleon as
released generates text only), so a loss on drawn images cannot go through it; the transformers
side runs `model.model` + `model.lm_head` and the same mean cross-entropy over the same targets.
Reported: real (non-pad) tokens per second, forward + backward + AdamW, float32 on CPU.
`--vocab` widens the vocabulary with unused text ids to a released model's size (Chameleon's is
65536): the LM head then dominates, and polymodal computes it on the scored positions only.

    python benchmarks/bench_unified.py --threads 2 [--docs 32] [--iters 6] [--vocab 65536] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lm import _rates, _ratios, _train_step, pad_right  # noqa: E402
from common import machine_info, save_json, time_interleaved  # noqa: E402

from polymodal.backbones.decoder import DecoderLM  # noqa: E402
from polymodal.interop.hf_chameleon_lm import chameleon_decoder_config, chameleon_lm_state  # noqa: E402
from polymodal.sequence import IGNORE_INDEX, pack_documents  # noqa: E402
from polymodal.train.objectives import sequence_loss, token_cross_entropy  # noqa: E402


def world_documents(docs: int):
    """(documents, vocabulary size, first code id, codes): one step's worth of unified-recipe documents."""
    from polymodal.data.world import world_tokenizer
    from polymodal.models.unified import UnifiedConfig, UnifiedModel
    from polymodal.recipes.unified import UnifiedDataConfig, WorldDocuments
    from polymodal.tokenizers.image_vq import ImageVQConfig

    tokenizer = world_tokenizer()
    image = ImageVQConfig(image_size=64, block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                          latent_channels=8, embed_dim=8, codebook_size=256)
    text = tokenizer.vocab_size
    lm = chameleon_decoder_config({"vocab_size": text + image.codebook_size + 1, "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                   "num_key_value_heads": 4})
    config = UnifiedConfig(lm=lm, image_tokenizer=image, text_vocab_size=text,
                           image_start_id=tokenizer.token_to_id("<|image_start|>"),
                           image_end_id=tokenizer.token_to_id("<|image_end|>"), image_token_id=tokenizer.token_to_id("<image>"))
    torch.manual_seed(0)
    data = UnifiedDataConfig(num_scenes=docs, docs_per_batch=docs, max_tokens=4096)
    source = WorldDocuments(UnifiedModel(config).eval(), tokenizer, data, seed=0)
    rng = np.random.default_rng(0)
    kinds = rng.choice(len(source.kinds), size=docs, p=source.weights)
    documents = [source.document(source.kinds[k], j, rng) for j, k in enumerate(kinds)]
    return documents, lm.vocab_size, text, image.codebook_size


def chameleon_pair(vocab: int, first_code: int, codes: int, width: int, depth: int, seed: int = 0):
    """(our DecoderLM, transformers ChameleonForConditionalGeneration) with the same random weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocabulary = {"<image>": 3, "<racm3:break>": 4, "<eoss>": 5}
    digits = "ABCDEFGHIJ"
    vocabulary.update({"IMGIMG" + "".join(digits[int(d)] for d in str(c)) + "Z": first_code + c for c in range(codes)})
    config = ChameleonConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 11 // 4 // 8 * 8,
                             num_hidden_layers=depth, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                             max_position_embeddings=4096, vocabulary_map=vocabulary, image_token_id=3,
                             vq_config={"embed_dim": 8, "num_embeddings": codes, "base_channels": 32,
                                        "channel_multiplier": [1, 1], "resolution": 32, "attn_resolutions": []},
                             attn_implementation="sdpa")
    torch.manual_seed(seed)
    theirs = ChameleonForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.05)
            else:
                param.normal_(0.0, 0.05)
    ours = DecoderLM(chameleon_decoder_config(config.to_dict()))
    ours.load_state_dict(chameleon_lm_state(theirs.state_dict(), ours.config))
    return ours, theirs


def padded_batch(documents) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, next-token labels) (B, T_max): each document alone, padded on the right."""
    rows = [pack_documents([doc], max_tokens=len(doc)) for doc in documents]
    ids, mask = pad_right([r.token_ids[0] for r in rows])
    labels, _ = pad_right([r.labels[0] for r in rows], pad_id=IGNORE_INDEX)
    return ids, mask, labels


def bench(docs: int, width: int, depth: int, max_tokens: int, warmup: int, iters: int,
          vocab_size: int = 0) -> dict:
    """Real tokens/s of polymodal packed and transformers padded training on the same documents;
    vocab_size > the documents' vocabulary pads it with ids no document uses."""
    documents, vocab, first_code, codes = world_documents(docs)
    vocab = max(vocab, vocab_size)
    ours, theirs = chameleon_pair(vocab, first_code, codes, width, depth)
    ids, mask, labels = padded_batch(documents)
    packed = pack_documents(documents, max_tokens=max_tokens)
    with torch.no_grad():
        probe = ids[:2, :64]
        diff = (ours(probe).logits - theirs.lm_head(theirs.model(input_ids=probe).last_hidden_state)).abs().max().item()
    if not diff < 1e-3:
        raise RuntimeError(f"polymodal and transformers Chameleon logits differ by {diff:.3g}: the import is wrong")

    def theirs_loss():
        hidden = theirs.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return token_cross_entropy(theirs.lm_head(hidden), labels)

    ours.train(), theirs.train()
    steps, losses = {}, {}
    steps["polymodal_packed"], losses["polymodal_packed"] = _train_step(ours, lambda: sequence_loss(ours, packed), "cpu")
    steps["transformers_padded"], losses["transformers_padded"] = _train_step(theirs, theirs_loss, "cpu")
    times = time_interleaved(steps, warmup, iters)
    first = {name: float(v[0]) for name, v in losses.items()}
    if abs(first["polymodal_packed"] - first["transformers_padded"]) > 1e-3 * max(1.0, first["transformers_padded"]):
        raise RuntimeError(f"the two first losses differ: {first}")
    real = sum(len(d) for d in documents)
    result = {"documents": len(documents), "real_tokens_per_step": real, "scored_targets": int((labels >= 0).sum()),
              "padded_shape": list(ids.shape), "packed_shape": list(packed.token_ids.shape),
              "vocab_size": vocab, "width": width, "depth": depth, "logits_max_abs_diff": diff, "first_loss": first,
              "params": sum(p.numel() for p in ours.parameters())}
    for name, timing in times.items():
        result[name] = _rates(timing, real, "real_tokens")
    result["ratio"] = _ratios(result, "real_tokens", "polymodal_packed", "transformers_padded")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few iterations (smoke run)")
    parser.add_argument("--docs", type=int, default=None, help="documents per step (default 32; 6 with --quick)")
    parser.add_argument("--width", type=int, default=256, help="hidden size, a multiple of 64 (default 256)")
    parser.add_argument("--depth", type=int, default=4, help="transformer layers (default 4)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="packed row length (default 1024)")
    parser.add_argument("--vocab", type=int, default=0,
                        help="vocabulary size (default: the documents' own, world text ids + codes + row end)")
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default 6; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    docs = args.docs or (6 if args.quick else 32)
    width, depth = (64, 1) if args.quick else (args.width, args.depth)
    iters = args.iters or (2 if args.quick else 6)
    result = bench(docs, width, depth, args.max_tokens, warmup=1 if args.quick else 2, iters=iters,
                   vocab_size=args.vocab)
    result["machine"] = machine_info("cpu")
    result["command"] = " ".join(["python"] + sys.argv)
    print(f"unified training: polymodal packed vs transformers Chameleon padded ({result['params'] / 1e6:.2f}M params, "
          f"{result['documents']} documents, {result['real_tokens_per_step']} real tokens, padded "
          f"{result['padded_shape']}, packed {result['packed_shape']}, cpu float32, {result['machine']['threads']} threads)")
    print(f"{'':22}{'tokens/s (median)':>20}{'tokens/s (best)':>18}")
    for name in ("polymodal_packed", "transformers_padded"):
        r = result[name]
        print(f"{name:22}{r['real_tokens_per_s']:>20.0f}{r['real_tokens_per_s_best']:>18.0f}")
    print(f"{'ratio':22}{result['ratio']['median']:>20.2f}{result['ratio']['best']:>18.2f}")
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
