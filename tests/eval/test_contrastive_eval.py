"""Zero-shot and retrieval metrics on hand-made similarity matrices with known answers; prompt
ensembling; the world suites on oracle embeddings whose right answers are known exactly."""
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn.functional import one_hot

import polymodal.eval.contrastive as contrastive_eval
from polymodal.data.dual_encoder import pixels_from_uint8
from polymodal.data.world import POSITION_NAMES, World
from polymodal.eval.contrastive import (
    class_embeddings,
    marginal_logits,
    prompts_from_templates,
    retrieval_recall,
    topk_accuracy,
    world_prompts,
    world_retrieval,
    world_zero_shot,
)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 2])
    out = topk_accuracy(logits, labels, ks=(1, 2))
    assert out["top1"] == pytest.approx(1 / 3)  # only row 0
    assert out["top2"] == pytest.approx(2 / 3)  # row 1's label is second; row 2's is last


def test_retrieval_recall_by_hand():
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2.
    sim = torch.tensor([
        [0.1, 0.9, 0.0, 0.2],
        [0.8, 0.0, 0.1, 0.3],
        [0.0, 0.2, 0.7, 0.1],
    ])
    text_to_image = torch.tensor([0, 0, 1, 2])
    out = retrieval_recall(sim, text_to_image, ks=(1, 2))
    # image->text top-1: image0 -> text1 (its own) hit; image1 -> text0 miss; image2 -> text2 miss.
    assert out["i2t_R@1"] == pytest.approx(1 / 3)
    # top-2: image1 -> {0, 3} miss; image2 -> {2, 1} miss.
    assert out["i2t_R@2"] == pytest.approx(1 / 3)
    # text->image top-1: t0 -> image1 miss, t1 -> image0 hit, t2 -> image2 miss, t3 -> image1 miss.
    assert out["t2i_R@1"] == pytest.approx(1 / 4)
    # top-2: t0 -> {1, 0} hit, t2 -> {2, 1} hit, t3 -> {1, 0} miss.
    assert out["t2i_R@2"] == pytest.approx(3 / 4)


def test_prompt_ensembling_averages_then_normalises():
    embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    classes = class_embeddings(embeds, [2, 1])
    torch.testing.assert_close(classes, torch.tensor([[2 ** -0.5, 2 ** -0.5], [1.0, 0.0]]))
    assert prompts_from_templates(["cat"], ["a {}", "the {}"]) == [["a cat", "the cat"]]


def test_world_prompts_cover_every_combination():
    combos, prompts = world_prompts()
    assert len(combos) == len(prompts) == 3 * 8 * 6 * 9
    assert combos[0] == ("small", "red", "circle", "top left")
    assert prompts[0] == "A small red circle in the top left."


def test_marginal_logits_sum_over_other_attributes():
    # 4 combinations of 2 classes; class 0 owns combos 0 and 2.
    logits = torch.tensor([[0.0, 1.0, 0.0, -5.0]])
    scores = marginal_logits(logits, torch.tensor([0, 1, 0, 1]), 2)
    torch.testing.assert_close(scores, torch.tensor([[math.log(2.0), math.log(math.e + math.exp(-5.0))]]))
    assert scores.argmax().item() == 1


def test_topk_accuracy_on_a_crafted_logits_matrix():
    """Each row's label is placed at a known rank (1st, 2nd, 3rd, 5th of 5), so top-k is known for every k."""
    logits = torch.tensor([
        [5.0, 1.0, 2.0, 3.0, 4.0],  # label 0: rank 1
        [1.0, 2.0, 9.0, 0.0, 3.0],  # label 4: rank 2
        [0.5, 0.4, 0.3, 0.9, 0.8],  # label 0: rank 3
        [2.0, 3.0, 4.0, 5.0, 1.0],  # label 4: rank 5 (last)
    ])
    labels = torch.tensor([0, 4, 0, 4])
    out = topk_accuracy(logits, labels, ks=(1, 2, 3, 4, 5, 7))
    assert out == {"top1": 0.25, "top2": 0.5, "top3": 0.75, "top4": 0.75, "top5": 1.0, "top7": 1.0}


def test_retrieval_recall_with_duplicate_captions_reaches_exactly_the_r1_ceiling():
    """Texts 0 and 1 are the same caption of two images that look the same (tied rows and
    columns): from text, one of them at most can be retrieved first, so the best possible t2i R@1
    is (1/2 + 1/2 + 1) / 3 = 2/3 (the mean over texts of 1 / copies of its caption), reached
    whichever way the tie breaks; R@2 holds both images."""
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.8]])
    out = retrieval_recall(sim, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert out["t2i_R@1"] == pytest.approx(2 / 3) and out["i2t_R@1"] == pytest.approx(2 / 3)
    assert out["t2i_R@2"] == out["i2t_R@2"] == 1.0


def test_marginal_logits_is_the_logsumexp_of_each_class_combinations():
    """Two rows, six combinations of three classes (class 2 owns none -> -inf), written out."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 3.0, 0.5], [4.0, -2.0, 0.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    combo_class = torch.tensor([0, 1, 0, 1, 1, 0])
    scores = marginal_logits(logits, combo_class, 3)
    for row in range(2):
        for c in range(2):
            want = math.log(sum(math.exp(v) for v, k in zip(logits[row].tolist(), combo_class.tolist()) if k == c))
            assert scores[row, c].item() == pytest.approx(want)
        assert scores[row, 2].item() == float("-inf")
    assert scores[:, :2].argmax(1).tolist() == [1, 0]  # row 0: class 1's 1 + 3 beat class 0's top 2


SUITE_SIZE = 32  # the oracle embeddings below ignore pixels, so the smallest world image will do


def _world_oracle(monkeypatch, split, n, image_embedding, text_embedding):
    """Replace the model's encoders (encode_images / encode_texts of the eval module) by oracle
    embeddings of the rendered scenes and the prompt texts; check the pixels are the scenes'."""
    scenes = list(World(split, image_size=SUITE_SIZE, num_objects=(1, 1)).scenes(n))
    pixels = pixels_from_uint8(np.stack([s.render() for s in scenes]))

    def encode_images(model, given):
        assert torch.equal(given, pixels)
        return torch.stack([image_embedding(s) for s in scenes])

    monkeypatch.setattr(contrastive_eval, "encode_images", encode_images)
    monkeypatch.setattr(contrastive_eval, "encode_texts",
                        lambda model, tokenizer, texts: torch.stack([text_embedding(x) for x in texts]))
    model = SimpleNamespace(config=SimpleNamespace(image_size=SUITE_SIZE), scale=lambda: torch.tensor(100.0))
    return model, scenes


def test_world_zero_shot_on_oracle_embeddings_with_one_wrong_attribute(monkeypatch):
    """Text k embeds as one-hot(k) over the 1,296 prompts; each image embeds as the one-hot of its
    own size, color and shape but the *next* grid position. Then color and shape are always right
    and position always wrong: exactly 1, 1 and 0."""
    combos, prompts = world_prompts()
    index = {combo: k for k, combo in enumerate(combos)}
    positions = list(POSITION_NAMES.values())

    def image_embedding(scene):
        o = scene.objects[0]
        shifted = positions[(positions.index(o.position) + 1) % len(positions)]
        return one_hot(torch.tensor(index[(o.size, o.color, o.shape, shifted)]), len(combos)).float()

    prompt_index = {p: k for k, p in enumerate(prompts)}
    model, _ = _world_oracle(monkeypatch, "val", 40, image_embedding,
                             lambda text: one_hot(torch.tensor(prompt_index[text]), len(combos)).float())
    assert world_zero_shot(model, None, "val", n=40) == {"zero_shot_color": 1.0, "zero_shot_shape": 1.0,
                                                        "zero_shot_position": 0.0}


def test_world_retrieval_on_oracle_embeddings_reaches_its_ceiling(monkeypatch):
    """Image and text both embed as the one-hot of the scene's detailed caption (a perfect model
    that sees exactly what the caption says). Scenes sharing a caption are then indistinguishable:
    strict R@1 both ways equals the ceiling, the number of distinct captions / n (one hit per
    group of copies whichever way ties break), the caption-match R@1 is 1, and R@K is 1 once K
    covers the largest group."""
    n = 150
    scenes = list(World("test", image_size=SUITE_SIZE, num_objects=(1, 1)).scenes(n))
    distinct = sorted({s.caption("detailed") for s in scenes})
    assert len(distinct) < n and max(Counter(s.caption("detailed") for s in scenes).values()) <= 5

    def embed(caption):
        return one_hot(torch.tensor(distinct.index(caption)), len(distinct)).float()

    model, _ = _world_oracle(monkeypatch, "test", n, lambda s: embed(s.caption("detailed")), embed)
    out = world_retrieval(model, None, "test", n=n)
    ceiling = len(distinct) / n
    assert out["t2i_R@1_ceiling"] == pytest.approx(ceiling) and out["t2i_R@1_match"] == 1.0
    assert out["t2i_R@1"] == pytest.approx(ceiling) and out["i2t_R@1"] == pytest.approx(ceiling)
    assert out["t2i_R@5"] == out["i2t_R@5"] == out["t2i_R@10"] == 1.0
