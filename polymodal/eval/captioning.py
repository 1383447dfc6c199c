"""Caption metrics from their formulas: corpus BLEU-n and CIDEr-D, as in the COCO caption evaluation.

Both take hypotheses (one string per image) and references (a list of strings per image) and
compare word sequences; `caption_tokens` lowercases and keeps runs of letters/digits, a light
stand-in for the COCO PTB tokenizer (which needs Java). Scores match `pycocoevalcap` on text
that is already lowercase and free of punctuation (tested).

BLEU (Papineni et al. 2002): modified n-gram precisions p_n = sum over images of clipped n-gram
matches / sum of hypothesis n-grams (each hypothesis n-gram counts at most as often as in the
reference that holds it most often); BLEU-N = BP * exp(mean_{n<=N} log p_n) with the corpus
brevity penalty BP = exp(1 - r / c) when c < r, else 1, where c is the total hypothesis length
and r the sum over images of the reference length closest to the hypothesis length (ties: the
shorter reference), as COCO's "closest" option. One difference: when some p_n is 0 we return 0
(Papineni's definition); COCO adds 1e-15 / 1e-9 to every ratio and reports a tiny positive value.

CIDEr-D (Vedantam et al. 2015, the COCO variant): each sentence becomes tf-idf vectors g_n over its
n-grams (n = 1..4), tf = count in the sentence, idf = log(I) - log(max(1, df)) with I the number
of images and df the number of images whose references contain the n-gram. For an image,
CIDEr-D_n = 10 / m * sum_j exp(-(l_h - l_j)^2 / (2 sigma^2)) * <min(g_n(h), g_n(r_j)), g_n(r_j)>
/ (|g_n(h)| |g_n(r_j)|) over its m references (sigma = 6, l = length in words, the min clips
repeated words); CIDEr-D = mean over n, and the corpus score is the mean over images.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def caption_tokens(text: str) -> list[str]:
    """Lowercase words of `text`: runs of ASCII letters/digits, punctuation dropped ("A red, circle." -> [a, red, circle])."""
    return _WORD.findall(text.lower())


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples of n words) of one sentence."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _tokenized(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise TypeError("hypotheses must be a list of strings and references a list of lists of strings")
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference lists; need one per image")
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str) or len(group) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {group!r}")
        refs.append([caption_tokens(r) for r in group])
    return [caption_tokens(h) for h in hypotheses], refs


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` in [0, 1] (see the module docstring); COCO's Bleu_4 is max_n=4."""
    hyps, refs = _tokenized(hypotheses, references)
    if max_n < 1:
        raise ValueError(f"corpus_bleu: max_n must be >= 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, group in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in group)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(hyp, n)
            most = Counter()
            for r in group:
                most |= ngram_counts(r, n)  # element-wise max over the references
            matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _tfidf(counts: Counter, log_images: float, doc_freq: Counter) -> tuple[dict, float]:
    """tf-idf vector of one sentence's n-gram counts and its L2 norm."""
    vec = {g: c * (log_images - math.log(max(1.0, doc_freq[g]))) for g, c in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D on the COCO scale (x10); returns (corpus mean, per-image scores).

    idf statistics come from `references` themselves, so scores depend on the whole corpus (as in
    COCO): score every image of an evaluation in one call.
    """
    hyps, refs = _tokenized(hypotheses, references)
    if not hyps:
        return 0.0, []
    ref_counts = [[[ngram_counts(r, n) for n in range(1, max_n + 1)] for r in group] for group in refs]
    doc_freq: Counter = Counter()
    for group in ref_counts:
        doc_freq.update({g for per_ref in group for counts in per_ref for g in counts})
    log_images = math.log(len(hyps))
    scores = []
    for hyp, group, group_counts in zip(hyps, refs, ref_counts):
        hyp_vecs = [_tfidf(ngram_counts(hyp, n), log_images, doc_freq) for n in range(1, max_n + 1)]
        total = 0.0
        for ref, per_ref in zip(group, group_counts):
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
            for (h_vec, h_norm), counts in zip(hyp_vecs, per_ref):
                r_vec, r_norm = _tfidf(counts, log_images, doc_freq)
                if h_norm == 0 or r_norm == 0:
                    continue
                dot = sum(min(v, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, v in h_vec.items())
                total += penalty * dot / (h_norm * r_norm)
        scores.append(10.0 * total / (max_n * len(group)))
    return sum(scores) / len(scores), scores


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4": corpus BLEU-4 in [0, 1], "cider": CIDEr-D (COCO scale, 0..10)} for a caption corpus."""
    return {"bleu4": corpus_bleu(hypotheses, references, 4), "cider": cider_d(hypotheses, references)[0]}
