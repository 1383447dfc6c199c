"""CLIP / SigLIP / caption losses against loop references, the `clip` family's objective against the
same references on the model's raw features, and two-process gathered-loss equivalence."""
import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from polymodal.models.contrastive import ContrastiveModel, clip_tiny
from polymodal.train.objectives import contrastive_loss
from polymodal.train.objectives.contrastive import caption_loss, clip_loss, siglip_loss


def _naive_clip(img, txt, scale):
    n, total = img.shape[0], 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def _naive_siglip(img, txt, scale, bias):
    n, total = img.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(img[i] @ txt[j]) + bias
            label = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-label * z))
    return total / n


def _embeds(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1))


def test_clip_loss_matches_loops():
    img, txt = _embeds(0)
    got = clip_loss(img, txt, torch.tensor(5.0, dtype=torch.float64))
    assert math.isclose(got.item(), _naive_clip(img, txt, 5.0), rel_tol=1e-5)


def test_siglip_loss_matches_loops():
    img, txt = _embeds(1)
    got = siglip_loss(img, txt, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))
    assert math.isclose(got.item(), _naive_siglip(img, txt, 10.0, -3.0), rel_tol=1e-5)


def _tiny_batch(config, n=5):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, config.text.vocab_size - 1, (n, 8), generator=g)
    ids[:, -1] = config.text.eos_token_id
    size = config.vision.image_size
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "input_ids": ids}


@pytest.mark.parametrize("loss, scale_init, bias_init", [
    ("clip", 1.5, -10.0),  # exp(1.5) = 4.48: a scale left un-exponentiated (1.5) is far off
    ("clip", 5.0, -10.0),  # exp(5) = 148 is capped at max_logit_scale = 100
    ("siglip", 1.2, -2.5),  # exp(1.2) = 3.32, and a bias that is not SigLIP's default
])
def test_contrastive_objective_equals_the_published_losses_on_raw_features(loss, scale_init, bias_init):
    """Oracle: the model's unnormalised features (`encode_image` / `encode_text`, the values of
    transformers' get_*_features), L2-normalised here, and the temperature computed here from the
    raw parameter as CLIP defines it, exp(logit_scale) capped at max_logit_scale (1 / 0.01 in
    CLIP), then the loop references above: InfoNCE (Radford et al., 2021) or SigLIP's sigmoid loss
    (Zhai et al., 2023, with the learnt bias). The model's own `scale()` is never consulted."""
    torch.manual_seed(0)
    config = dataclasses.replace(clip_tiny(), loss=loss, logit_scale_init=scale_init, logit_bias_init=bias_init)
    model = ContrastiveModel(config).eval()
    batch = _tiny_batch(config)
    with torch.no_grad():
        img = model.encode_image(batch["pixel_values"]).double()
        txt = model.encode_text(batch["input_ids"]).double()
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        scale = min(math.exp(float(model.logit_scale)), config.max_logit_scale)
        bias = float(model.logit_bias)
        got = contrastive_loss(model, batch).item()
        out = model(**batch)
    assert (scale, bias) == (pytest.approx(min(math.exp(scale_init), 100.0)), pytest.approx(bias_init))
    want = _naive_clip(img, txt, scale) if loss == "clip" else _naive_siglip(img, txt, scale, bias)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    logits = scale * img @ txt.t() + (bias if loss == "siglip" else 0.0)  # (B_img, B_txt)
    torch.testing.assert_close(out.logits_per_image.double(), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits_per_text.double(), logits.t(), atol=1e-4, rtol=1e-4)


def test_caption_loss_skips_padding_and_first_token():
    logits = torch.randn(2, 4, 5)
    captions = torch.tensor([[1, 2, 3, 0], [4, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    terms = [-(logits[b, t].log_softmax(-1)[captions[b, t + 1]]) for b, t in ((0, 0), (0, 1), (1, 0))]
    torch.testing.assert_close(caption_loss(logits, captions, mask), torch.stack(terms).mean())


def _model_and_data():
    """Two linear towers on fixed features: small enough for a spawn test, real gradients."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(5, 4), "text": torch.nn.Linear(3, 4)})
    scale = torch.nn.Parameter(torch.tensor(2.0))
    bias = torch.nn.Parameter(torch.tensor(-1.0))
    g = torch.Generator().manual_seed(1)
    return towers, scale, bias, torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _loss_and_grads(kind, rows):
    towers, scale, bias, x_img, x_txt = _model_and_data()
    img = F.normalize(towers["image"](x_img[rows]), dim=-1)
    txt = F.normalize(towers["text"](x_txt[rows]), dim=-1)
    loss = clip_loss(img, txt, scale.exp()) if kind == "clip" else siglip_loss(img, txt, scale.exp(), bias)
    loss.backward()
    params = list(towers.parameters()) + [scale, bias]
    return loss.detach(), [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in ("clip", "siglip"):
            loss, grads = _loss_and_grads(kind, slice(rank * 4, rank * 4 + 4))
            dist.all_reduce(loss)
            for g in grads:  # what DDP does: average the gradients over ranks
                dist.all_reduce(g)
            results[kind] = (loss / world, [g / world for g in grads])
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_full_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "dist.pt", weights_only=True)
    for kind in ("clip", "siglip"):
        loss, grads = _loss_and_grads(kind, slice(0, 8))
        dist_loss, dist_grads = results[kind]
        torch.testing.assert_close(dist_loss, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(dist_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in grads)
