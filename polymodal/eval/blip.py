"""`polymodal eval` for the `blip` family: retrieval R@K, ITM accuracy and captioning CIDEr on the world.

On n single-object scenes of a split, each with its detailed caption (the `clip` family's
retrieval set, `polymodal.eval.contrastive.world_retrieval`, so the figures compare):
- retrieval: Recall@K both ways from the ITC similarities (`retrieval_recall`), the text->image
  R@1 ceiling set by identical captions, and `t2i_R@1_itm`: BLIP's inference, the top `rerank`
  images of the ITC ranking re-ordered by ITM match logit + ITC cosine (the score BLIP's
  retrieval evaluation, blip_retrieval.py, ranks by);
- ITM accuracy (threshold 0.5) over every positive pair and one negative per image whose caption
  differs: a random one (`itm_acc`) and the most ITC-similar one (`itm_acc_hard`);
- captioning: greedy captions scored against all of a scene's short and detailed captions
  (`caption_scores`: BLEU-4 and CIDEr-D).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from polymodal.data.dual_encoder import scene_pixels
from polymodal.errors import UsageError
from polymodal.eval.captioning import caption_scores
from polymodal.eval.contrastive import retrieval_recall


@torch.no_grad()
def _image_features(model, pixels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image tokens (N, P, Dv), normalised ITC embeddings (N, E) or None without retrieval)."""
    tokens, embeds = [], []
    for s in range(0, len(pixels), batch):
        t, pooled = model.encode_image_tokens(pixels[s:s + batch])
        tokens.append(t)
        if model.config.retrieval:
            embeds.append(F.normalize(model.vision_proj(pooled), dim=-1))
    return torch.cat(tokens), torch.cat(embeds) if embeds else None


@torch.no_grad()
def _itm(model, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """ITM logits (M, 2), on the CPU, of image tokens (M, P, Dv) with texts (M, T) on the model's
    device, first token swapped to [ENC]."""
    from polymodal.models.blip import with_first_token

    ids = with_first_token(ids, model.config.text.enc_token_id)
    return torch.cat([model.itm_logits(tokens[s:s + batch], ids[s:s + batch], mask[s:s + batch]).float().cpu()
                      for s in range(0, len(ids), batch)])


def _match(model, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """P(match) (M,) of image tokens (M, P, Dv) with texts (M, T)."""
    return _itm(model, tokens, ids, mask, batch).softmax(-1)[:, 1]


@torch.no_grad()
def retrieval_and_itm(model, tokenizer, scenes, tokens: torch.Tensor, image_embeds: torch.Tensor,
                      rerank: int = 16, batch: int = 256, seed: int = 0) -> dict[str, float]:
    """The retrieval and ITM metrics of the module docstring for scenes with their image features."""
    from polymodal.recipes.blip import blip_tokenize

    n = len(scenes)
    texts = [s.caption("detailed") for s in scenes]
    device = tokens.device  # the model's: texts go there, scores and indices come back to the CPU
    ids, mask = (t.to(device) for t in blip_tokenize(model.config, tokenizer, texts))
    text_embeds = torch.cat([F.normalize(model.encode_text(ids[s:s + batch], mask[s:s + batch]), dim=-1)
                             for s in range(0, n, batch)])
    similarity = (image_embeds @ text_embeds.t()).float().cpu()  # (N_img, N_txt)
    out = retrieval_recall(similarity, torch.arange(n))
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    out["t2i_R@1_ceiling"] = float(np.mean([1.0 / counts[t] for t in texts]))
    k = min(rerank, n)
    top = similarity.t().topk(k, dim=1).indices  # (N_txt, k) candidate images per text
    text_rows = torch.arange(n).repeat_interleave(k)
    pairs = top.reshape(-1).to(device), text_rows.to(device)
    score = _itm(model, tokens[pairs[0]], ids[pairs[1]], mask[pairs[1]], batch)[:, 1].view(n, k)
    score = score + similarity.t().gather(1, top)  # (N_txt, k)
    out["t2i_R@1_itm"] = (top[torch.arange(n), score.argmax(1)] == torch.arange(n)).float().mean().item()
    # One negative text per image among the captions that differ from its own.
    differs = torch.tensor([[a != b for b in texts] for a in texts])  # (N, N)
    rng = np.random.default_rng(seed)
    random_neg = torch.tensor([int(rng.choice(np.flatnonzero(row))) for row in differs.numpy()])
    hard_neg = similarity.masked_fill(~differs, float("-inf")).argmax(1)
    images = torch.arange(n)
    positive = _match(model, tokens, ids, mask, batch) >= 0.5
    for name, neg in (("itm_acc", random_neg), ("itm_acc_hard", hard_neg)):
        negative = _match(model, tokens, ids[neg.to(device)], mask[neg.to(device)], batch) < 0.5
        out[name] = torch.cat([positive[images], negative]).float().mean().item()
    return out


@torch.no_grad()
def captioning(model, tokenizer, scenes, pixels: torch.Tensor, batch: int = 128,
               max_new_tokens: int = 24) -> dict[str, float]:
    """Greedy captions of the scenes scored against all their short and detailed captions."""
    from polymodal.recipes.blip import decode_captions

    rows = []
    for s in range(0, len(pixels), batch):
        rows += model.generate_captions(pixels[s:s + batch], max_new_tokens=max_new_tokens)
    hypotheses = decode_captions(tokenizer, rows)
    return caption_scores(hypotheses, [scene.captions() for scene in scenes])


def evaluate(model, tokenizer, data: str = "world", split: str = "test", n: int = 1000,
             progress: bool = True) -> dict[str, float]:
    """`polymodal eval` for the `blip` family on n single-object world scenes of `split`: the
    metrics of each side the model has (module docstring)."""
    from tqdm import tqdm

    from polymodal.data.world import World

    if data != "world":
        raise UsageError(f"--data: the blip family evaluates on 'world', got {data!r}")
    if tokenizer is None:
        raise UsageError("this BLIP checkpoint has no tokenizer; evaluation needs one to encode and decode captions")
    if n < 2:
        raise UsageError(f"--n: retrieval needs at least 2 scenes, got {n}")
    model.eval()
    scenes = list(World(split, image_size=model.config.image_size, num_objects=(1, 1)).scenes(n))
    pixels = scene_pixels(scenes).to(next(model.parameters()).device)
    suites = [name for name, on in (("retrieval", model.config.retrieval), ("captioning", model.config.captioning))
              if on]
    metrics: dict[str, float] = {}
    tokens, image_embeds = _image_features(model, pixels, 256)
    for suite in tqdm(suites, desc="eval blip (world)", unit="suite", disable=not progress):
        if suite == "retrieval":
            metrics.update(retrieval_and_itm(model, tokenizer, scenes, tokens, image_embeds))
        else:
            metrics.update(captioning(model, tokenizer, scenes, pixels))
    return metrics
