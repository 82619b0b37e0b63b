"""data/generate.py: the embedded default dataset's formulas."""

from __future__ import annotations

import statistics

import pytest

from data.generate import generate_formulas
from data.normalize import detokenize, normalize


@pytest.fixture(scope="module")
def formulas() -> list[str]:
    return generate_formulas(2000, seed=0)


def test_count_distinct_and_deterministic(formulas):
    assert len(formulas) == 2000
    assert len(set(formulas)) == 2000
    assert generate_formulas(300, seed=0) == formulas[:300]
    assert generate_formulas(300, seed=1) != formulas[:300]
    assert generate_formulas(0) == []
    with pytest.raises(ValueError):
        generate_formulas(-1)


def test_every_formula_is_normalized(formulas):
    assert [f for f in formulas if normalize(f) != f] == []


def test_lengths_spread_from_short_to_long(formulas):
    lengths = [len(f.split()) for f in formulas]
    assert min(lengths) <= 8
    assert max(lengths) >= 80
    assert 20 <= statistics.median(lengths) <= 50
    assert sum(n > 60 for n in lengths) >= 100  # a real tail of long formulas


@pytest.mark.parametrize("construct", [
    "\\frac {", " ^ { ", " _ { ", "\\alpha", "\\sum _ {", "\\int", "\\prod _ {", "\\lim _ {",
    "\\begin{array} {", "\\begin{pmatrix}", "\\hat {", "\\bar {", "\\vec {", "\\tilde {",
    "\\dot {", "\\left(", "\\left[", "\\left\\{", "\\left|", "\\mathrm {", "\\mathbf {",
    "\\mathcal {", "\\,", "\\quad", "\\;", "\\sqrt {", "\\sqrt [", "\\leq", "\\sin", "\\to",
])
def test_constructs_all_occur(formulas, construct):
    assert any(construct in f for f in formulas)


def test_common_tokens_are_common(formulas):
    tokens = [t for f in formulas for t in f.split()]
    share = {t: tokens.count(t) / len(tokens) for t in ("=", "x", "\\frac", "\\varphi")}
    assert share["="] > share["\\frac"] > share["\\varphi"]
    assert share["x"] > 0.005


def test_a_sample_compiles():
    render = pytest.importorskip("data.render")
    sample = generate_formulas(50, seed=7)
    images = render.render_formulas([detokenize(f) for f in sample],
                                    render.RenderOptions(strict=True))
    assert [f for f, img in zip(sample, images) if img is None] == []
