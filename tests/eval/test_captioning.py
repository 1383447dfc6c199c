"""BLEU and CIDEr-D against the COCO caption evaluation (`pycocoevalcap`) and hand-computed cases."""
import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from polymodal.data.world import World
from polymodal.eval.captioning import (
    caption_scores,
    caption_tokens,
    cider_d,
    corpus_bleu,
)


def _corpus(n=40, seed=0):
    """World captions as references; hypotheses are references with words dropped/swapped/replaced."""
    rng = np.random.default_rng(seed)
    hyps, refs = [], []
    for scene in World("val", num_objects=(1, 4)).scenes(n):
        group = [" ".join(caption_tokens(c)) for c in scene.captions()]
        words = group[int(rng.integers(len(group)))].split()
        for _ in range(int(rng.integers(0, 4))):
            k = int(rng.integers(len(words)))
            op = rng.integers(3)
            if op == 0 and len(words) > 1:
                del words[k]
            elif op == 1:
                words.insert(k, ["red", "big", "the", "shape"][int(rng.integers(4))])
            else:
                j = int(rng.integers(len(words)))
                words[k], words[j] = words[j], words[k]
        hyps.append(" ".join(words))
        refs.append(group[:3 + len(refs) % 5])  # 3..7 references per image, as COCO varies too
    return hyps, refs


def _coco(hyps, refs):
    gts = {i: list(r) for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return bleu, cider, per_image


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pycocoevalcap_on_world_captions(seed):
    hyps, refs = _corpus(seed=seed)
    bleu, cider, per_image = _coco(hyps, refs)
    for n in range(1, 5):
        assert corpus_bleu(hyps, refs, n) == pytest.approx(bleu[n - 1], rel=1e-6)
    ours, ours_per_image = cider_d(hyps, refs)
    assert ours == pytest.approx(cider, rel=1e-9)
    assert ours_per_image == pytest.approx(list(per_image), rel=1e-9, abs=1e-12)
    assert 0.0 < bleu[3] < 1.0 and 0.0 < cider  # a non-degenerate corpus


def test_short_hypotheses_get_the_brevity_penalty_like_coco():
    hyps = ["a red circle", "a blue square"]
    refs = [["red circle", "a big red circle"],
            ["a blue square and a green star on a dark background", "two objects a blue square and a green star"]]
    bleu, cider, _ = _coco(hyps, refs)
    assert corpus_bleu(hyps, refs, 2) == pytest.approx(bleu[1], rel=1e-6)
    # every hypothesis word matches (p1 = 1); closest reference lengths 2 (a tie of 2 and 4 goes to
    # the shorter) and 9 -> r = 11 against c = 6
    assert corpus_bleu(hyps, refs, 1) == pytest.approx(math.exp(1 - 11 / 6), rel=1e-9)
    assert cider_d(hyps, refs)[0] == pytest.approx(cider, rel=1e-9)


def test_bleu_hand_computed():
    # one image, 7 words each (BP = 1): unigram matches the x2, cat, sat, on, mat (not "red") -> p1 = 6/7;
    # bigram matches "the cat", "cat sat", "sat on", "on the" -> p2 = 4/6
    hyp = ["the cat sat on the red mat"]
    ref = [["the cat sat on the mat today"]]
    p1, p2 = 6 / 7, 4 / 6
    assert corpus_bleu(hyp, ref, 1) == pytest.approx(p1)
    assert corpus_bleu(hyp, ref, 2) == pytest.approx(math.sqrt(p1 * p2))
    # clipping: "the the the" against a reference with one "the" scores p1 = 1/3
    assert corpus_bleu(["the the the"], [["the cat is here"]], 1) == pytest.approx(1 / 3 * math.exp(1 - 4 / 3))


def test_bleu_is_zero_without_a_four_gram_match_and_one_for_a_copy():
    assert corpus_bleu(["a red circle"], [["a red circle"]], 4) == 0.0  # no 4-grams at all
    assert corpus_bleu(["a b c d e"], [["a b c d e"]], 4) == pytest.approx(1.0)
    assert corpus_bleu([""], [["a b"]], 1) == 0.0


def test_cider_hand_computed_two_images():
    # I = 2 images; "x" appears in both images' references (idf 0), "a"/"b" in one each (idf log 2).
    hyps, refs = ["a x", "b"], [["a x"], ["b x"]]
    # image 0, unigrams: hyp = ref = {a: idf, x: 0} -> cosine 1; bigram "a x" df 1 -> cosine 1; n=3,4 empty.
    image0 = 10 * (1 + 1) / 4
    # image 1, unigrams: hyp {b: idf}, ref {b: idf, x: 0} -> cosine 1; length penalty for 1 vs 2 words.
    image1 = 10 * math.exp(-1 / 72) * 1 / 4
    mean, per_image = cider_d(hyps, refs)
    assert per_image == pytest.approx([image0, image1])
    assert mean == pytest.approx((image0 + image1) / 2)
    _, _, coco_per_image = _coco(hyps, refs)
    assert per_image == pytest.approx(list(coco_per_image))


def test_tokens_and_argument_errors():
    assert caption_tokens("A Red, circle. On the LEFT!") == ["a", "red", "circle", "on", "the", "left"]
    scores = caption_scores(["A red circle."], [["a red circle"]])
    assert set(scores) == {"bleu4", "cider"}
    with pytest.raises(ValueError, match="reference lists"):
        corpus_bleu(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        cider_d(["a"], [[]])
    with pytest.raises(TypeError):
        corpus_bleu("a red circle", [["a red circle"]])
