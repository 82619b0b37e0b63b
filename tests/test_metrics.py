import numpy as np
import pytest

from data.metrics import image_scores, text_scores


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
