"""Zero-shot and retrieval metrics on hand-made similarity matrices; prompt ensembling."""
import math

import pytest
import torch

from polymodal.eval.contrastive import (
    class_embeddings,
    marginal_logits,
    prompts_from_templates,
    retrieval_recall,
    topk_accuracy,
    world_prompts,
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
