import random

import numpy as np
import pytest

from data.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    folded_scores,
    image_scores,
    paired_bootstrap,
    text_scores,
)


def test_perfect_predictions_score_100():
    refs = ["\\frac { a } { b } + c", "x ^ { 2 } = y _ { i }"]
    s = text_scores(refs, refs)
    assert s["bleu4"] == pytest.approx(100) and s["edit_distance"] == 100
    assert s["exact_match"] == 100


def test_edit_distance_counts_tokens_over_longer_length():
    # one substitution in 4 tokens, one deletion in 2 -> 1 - 2/6
    s = text_scores(["a b c d", "x y"], ["a b z d", "x"])
    assert s["edit_distance"] == pytest.approx(100 * (1 - 2 / 6))
    assert s["exact_match"] == 0


def test_lines_are_paired_by_position():
    refs, hyps = ["a", "b"], ["b", "a"]
    assert text_scores(refs, hyps)["exact_match"] == 0
    with pytest.raises(ValueError):
        text_scores(["a"], ["a", "b"])


def test_image_match_ignores_position_but_not_content():
    img = np.full((40, 100), 255, np.uint8)
    img[10:20, 10:30] = 0
    shifted = np.full((50, 120), 255, np.uint8)
    shifted[25:35, 60:80] = 0
    other = img.copy()
    other[10:20, 35:37] = 0
    s = image_scores([img, img, img], [shifted, other, None])
    assert s["image_exact_match"] == pytest.approx(100 / 3)
    assert 0 < s["image_edit_distance"] < 100


def _random_corpus(seed: int, n: int = 60) -> tuple[list[str], list[str]]:
    """References and noisy, sometimes truncated or empty, predictions over a small alphabet."""
    rng = random.Random(seed)
    words = "a b c x y \\frac { } ^ _ +".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(n)]
    hyps = [" ".join(w if rng.random() < 0.8 else rng.choice(words)
                     for w in r.split()[:rng.randint(0, 30)]) for r in refs]
    return refs, hyps


@pytest.mark.parametrize("seed", range(10))
def test_bleu_from_summed_sentence_statistics_is_nltk_corpus_bleu(seed):
    refs, hyps = _random_corpus(seed)
    stats = np.stack([bleu_statistics(r.split(), h.split()) for r, h in zip(refs, hyps)])
    assert bleu_from_statistics(stats.sum(0)) == pytest.approx(text_scores(refs, hyps)["bleu4"],
                                                               abs=1e-9)


def test_paired_bootstrap_sees_a_real_gain_and_no_difference_between_equals():
    refs, worse = _random_corpus(1, n=300)
    better = [r if i % 3 == 0 else h for i, (r, h) in enumerate(zip(refs, worse))]
    gain = paired_bootstrap(refs, worse, better, resamples=300)
    assert gain["diff"] == pytest.approx(text_scores(refs, better)["bleu4"]
                                         - text_scores(refs, worse)["bleu4"])
    assert 0 < gain["low"] < gain["diff"] < gain["high"] and gain["wins"] == 1.0
    # two systems with the same predictions differ by nothing in every resample
    same = paired_bootstrap(refs, worse, list(worse), resamples=300)
    assert same == {"diff": 0.0, "sd": 0.0, "low": 0.0, "high": 0.0, "wins": 0.0}
    with pytest.raises(ValueError, match="references"):
        paired_bootstrap(refs, worse, better[:-1])


def test_folded_scores_forgive_the_spelling_of_a_font_switch_and_nothing_else():
    refs = [r"{ \cal L } = \int _ { 0 } ^ { 1 } f ( x ) d x", r"\mathrm { d } x + y = z"]
    same_image = [r"\mathcal { L } = \int _ { 0 } ^ { 1 } f ( x ) d x", r"{ \rm d } x + y = z"]
    misread = [r"{ \cal C } = \int _ { 0 } ^ { 1 } f ( x ) d x", r"\mathrm { d } x + y = z"]
    assert folded_scores(refs, same_image) == {"bleu4_folded": pytest.approx(100.0),
                                               "exact_match_folded": 100.0}
    assert text_scores(refs, same_image)["bleu4"] < 90.0
    plain, folded = text_scores(refs, misread), folded_scores(refs, misread)
    assert folded["bleu4_folded"] == pytest.approx(plain["bleu4"]) and plain["bleu4"] < 95.0
    assert folded["exact_match_folded"] == plain["exact_match"] == 50.0
