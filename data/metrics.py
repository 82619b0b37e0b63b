"""Scores of predicted formulas against references: BLEU-4, edit distance, exact match, and the
rendered-image metrics of Deng et al. 2017; per-sentence BLEU and edit similarity for
sequence-level training's rewards (training/sequence.py).

All scores are corpus-level over token sequences, one reference per image, nothing truncated:
the published luopeixiang/im2latex numbers were depressed by merged result lines and references
cut short, so lines are paired here by position and never altered.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import Levenshtein
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from data.spelling import respell


def token_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences of tokens (or of image columns)."""
    return Levenshtein.distance(a, b)


def edit_similarity(ref: Sequence, hyp: Sequence) -> float:
    """1 - token edit distance / the longer length, in [0, 1]: one sentence's share of
    `text_scores`' edit-distance figure (1 for two empty sequences)."""
    longest = max(len(ref), len(hyp))
    return 1.0 - token_distance(ref, hyp) / longest if longest else 1.0


_SMOOTH = SmoothingFunction().method3  # Chen & Cherry's "exp": 1/2^k for the k-th empty order


def sentence_bleu(ref: Sequence, hyp: Sequence) -> float:
    """BLEU-4 of one prediction against its reference, in [0, 1] (nltk, as `text_scores`).

    One sentence needs what a corpus does not: smoothing (Chen & Cherry 2014's method 3, the
    "exp" smoothing sacrebleu's sentence BLEU uses), so that a prediction with no matching
    4-gram still scores by its other orders instead of 0; and the effective order (n-grams up
    to the prediction's length), so that an exact match shorter than 4 tokens scores 1."""
    if not ref or not hyp:
        return float(len(ref) == len(hyp))
    order = min(4, len(hyp))
    return nltk_sentence_bleu([list(ref)], list(hyp), weights=(1 / order,) * order,
                              smoothing_function=_SMOOTH)


def text_scores(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """BLEU-4 (nltk corpus_bleu), edit-distance similarity and exact match, in percent."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} predictions")
    if not refs:
        raise ValueError("nothing to score")
    ref_toks = [r.split() for r in refs]
    hyp_toks = [h.split() for h in hyps]
    with warnings.catch_warnings():  # nltk warns on every corpus with a sentence under 4 tokens
        warnings.simplefilter("ignore", UserWarning)
        bleu = corpus_bleu([[r] for r in ref_toks], hyp_toks)
    dist = sum(token_distance(r, h) for r, h in zip(ref_toks, hyp_toks))
    longest = sum(max(len(r), len(h)) for r, h in zip(ref_toks, hyp_toks))
    exact = sum(r == h for r, h in zip(ref_toks, hyp_toks))
    return {"bleu4": 100 * bleu, "edit_distance": 100 * (1 - dist / max(longest, 1)),
            "exact_match": 100 * exact / len(refs)}


def folded_scores(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    r"""BLEU-4 and exact match with both sides in one spelling of fonts, primes and arrows
    (data/spelling.py): `\mathcal { L }` and `{ \cal L }` typeset the same image, so what
    these gain over `text_scores` is what a reading loses to spelling rather than to reading."""
    scores = text_scores([respell(r) for r in refs], [respell(h) for h in hyps])
    return {"bleu4_folded": scores["bleu4"], "exact_match_folded": scores["exact_match"]}


def bleu_statistics(ref: Sequence, hyp: Sequence) -> np.ndarray:
    """One sentence's share of corpus BLEU-4: [hyp length, ref length, then for n = 1..4 the
    clipped n-gram matches and the hypothesis's n-gram count (at least 1, as nltk counts it)].
    Corpus BLEU is a function of these sums (`bleu_from_statistics`), so a bootstrap resamples
    rows of a matrix instead of re-tokenizing and re-counting the corpus each time."""
    row = np.zeros(10, dtype=np.int64)
    row[0], row[1] = len(hyp), len(ref)
    for n in range(1, 5):
        ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        row[2 * n] = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items())
        row[2 * n + 1] = max(len(hyp) - n + 1, 1)  # nltk counts at least 1 per sentence
    return row


def bleu_from_statistics(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 in percent from summed `bleu_statistics`: (..., 10) -> (...), as nltk's
    corpus_bleu computes it without smoothing (0 when some order has no match; brevity
    penalty exp(1 - r/c) when the predictions are shorter than the references)."""
    hyp_len, ref_len = stats[..., 0].astype(float), stats[..., 1].astype(float)
    matches, totals = stats[..., 2::2].astype(float), stats[..., 3::2].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.where(matches > 0, np.log(matches / np.maximum(totals, 1)), -np.inf).mean(-1)
        brevity = np.where(hyp_len < ref_len, 1 - ref_len / np.maximum(hyp_len, 1), 0.0)
        bleu = np.exp(log_p + brevity)
    return 100 * np.where(hyp_len > 0, bleu, 0.0)


def paired_bootstrap(refs: Sequence[str], base: Sequence[str], other: Sequence[str],
                     resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """How sure a corpus BLEU-4 difference (other - base, same images) is: Koehn 2004's paired
    bootstrap. The images are resampled with replacement and both systems scored on each
    resample, so what the two get right or wrong together cancels; the spread of the
    difference is its noise. Returns the difference on all images, its bootstrap standard
    deviation, the 95% interval and the share of resamples where `other` wins."""
    if not len(refs) == len(base) == len(other) > 0:
        raise ValueError(f"{len(refs)} references, {len(base)} and {len(other)} predictions")
    tok = [r.split() for r in refs]
    a = np.stack([bleu_statistics(r, h.split()) for r, h in zip(tok, base)])
    b = np.stack([bleu_statistics(r, h.split()) for r, h in zip(tok, other)])
    idx = np.random.default_rng(seed).integers(0, len(refs), size=(resamples, len(refs)))
    diff = bleu_from_statistics(b[idx].sum(1)) - bleu_from_statistics(a[idx].sum(1))
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"diff": float(bleu_from_statistics(b.sum(0)) - bleu_from_statistics(a.sum(0))),
            "sd": float(diff.std()), "low": float(lo), "high": float(hi),
            "wins": float((diff > 0).mean())}


def image_columns(img: np.ndarray, threshold: int = 128) -> list[bytes]:
    """An image as a sequence of binarized columns, cropped to the ink horizontally and
    vertically, so two renders of one formula compare equal wherever they sit on the canvas."""
    ink = img < threshold
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        return []
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return [np.packbits(c).tobytes() for c in ink.T]


def image_scores(refs: Sequence[np.ndarray | None],
                 hyps: Sequence[np.ndarray | None]) -> dict[str, float]:
    """Deng et al.'s rendered-image exact match and column edit distance, in percent.

    Each image becomes a sequence of pixel columns; the edit distance between the two
    sequences, over the longer length, gives the similarity, and a distance of zero is a match
    (a prediction that renders like the reference counts as right even when its tokens
    differ). A prediction that fails to render scores zero; a reference that fails to render is
    left out, as it cannot be scored."""
    dist = longest = exact = n = 0
    for r, h in zip(refs, hyps):
        if r is None:
            continue
        n += 1
        rc = image_columns(r)
        hc = image_columns(h) if h is not None else []
        if h is None:
            dist += len(rc)
            longest += len(rc)
            continue
        d = token_distance(rc, hc)
        dist += d
        longest += max(len(rc), len(hc))
        exact += d == 0 and rc == hc
    if n == 0:
        raise ValueError("no reference rendered")
    return {"image_exact_match": 100 * exact / n,
            "image_edit_distance": 100 * (1 - dist / max(longest, 1)), "image_scored": n}
