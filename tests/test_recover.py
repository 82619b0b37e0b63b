"""data/recover.py: each rewrite, the training preamble, and that the fixed val/test sets stay
exactly as they were (their normalization, and no rewrite in the build)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data.build import build_dataset
from data.layout import read_lines
from data.normalize import NormalizeError, detokenize, normalize
from data.recover import DROP, REPLACE, WRAP, recover, train_style
from data.render import RenderOptions, render_results
from tests.conftest import HAVE_TEX, SHARED

needs_tex = pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")

REWRITES = [
    ("\\R ^ { n }", "\\mathbb { R } ^ { n }", ["\\R"]),
    ("x \\in \\NN", "x \\in \\mathbb { N }", ["\\NN"]),
    ("\\E _ { \\theta } [ X ]", "\\mathbb { E } _ { \\theta } [ X ]", ["\\E"]),
    ("\\Tr A", "\\operatorname { T r } A", ["\\Tr"]),
    ("\\argmin _ { x } f", "\\operatorname* { a r g \\, m i n } _ { x } f", ["\\argmin"]),
    ("\\la x , y \\ra", "\\langle x , y \\rangle", ["\\la", "\\ra"]),
    ("\\eps > 0", "\\varepsilon > 0", ["\\eps"]),
    ("\\int f \\dd x", "\\int f \\mathrm { d } x", ["\\dd"]),
    ("\\bm { x } + \\bm \\theta", "\\boldsymbol { x } + \\boldsymbol \\theta", ["\\bm"]),
    ("\\wt { u }", "\\widetilde { u }", ["\\wt"]),
    ("\\mathds { 1 }", "\\mathbb { 1 }", ["\\mathds"]),
    ("\\cF _ { t } \\cA", "\\mathcal { F } _ { t } \\mathcal { A }", ["\\cX"]),
    ("\\norm { u } _ { 2 }", "\\| u \\| _ { 2 }", ["\\norm"]),
    ("\\abs x", "| x |", ["\\abs"]),
    ("\\ket { \\psi }", "| \\psi \\rangle", ["\\ket"]),
    ("\\bra { 0 }", "\\langle 0 |", ["\\bra"]),
    ("a = b \\nn", "a = b", ["\\nn"]),
    ("\\norm { \\R x }", "\\| \\mathbb { R } x \\|", ["\\norm", "\\R"]),
]


@pytest.mark.parametrize("formula, expected, used", REWRITES)
def test_each_rewrite(formula, expected, used):
    assert recover(formula) == (expected, used)
    assert normalize(expected) == expected  # the label stays in normalized form


@pytest.mark.parametrize("formula", [
    "\\Re z + \\Rightarrow + \\mathbb { R }",  # names that only start like a shorthand
    "\\Pi _ { \\al \\la } ^ { \\la }",  # a lone \la is as often \lambda as \langle
    "\\norm",  # no argument: left alone (and dropped by the render, as before)
    "\\norm _ { 2 }",
    "\\frac { a } { b }",
])
def test_formulas_without_a_usable_shorthand_are_unchanged(formula):
    assert recover(formula) == (formula, [])


@needs_tex
def test_rewrites_and_packages_render_where_the_plain_preamble_fails():
    every = (" ".join(f"{k} x" for k in REPLACE) + " " + " ".join(f"{k} {{ y }}" for k in WRAP)
             + " " + " ".join(DROP))
    rewritten = recover(every)[0]
    packaged = "\\mathbb { R } \\mathscr { L } \\lesssim \\mathfrak { g } \\leqslant"
    opts = RenderOptions(workers=1, strict=True)
    plain = render_results([detokenize(every), detokenize(packaged)], opts)
    assert plain[0].image is None and plain[1].image is None
    train = render_results([detokenize(rewritten), detokenize(packaged)],
                           RenderOptions(workers=1, strict=True, style=train_style("cm")))
    assert [r.error for r in train] == [None, None]


@needs_tex
@pytest.mark.parametrize("style", ["cm", "times", "euler"])
def test_training_packages_change_no_pixel_of_other_formulas(style):
    # amsfonts would redraw \hbar, \angle, \rightleftharpoons and scale cmex in scripts.
    formulas = [
        "\\hbar \\omega + \\angle A \\rightleftharpoons B",
        "\\left( \\frac { d \\alpha } { d \\tau } \\right) ^ { 2 } "
        "+ e ^ { \\sum _ { i } x _ { i } }",
        "x ^ { \\int _ { 0 } ^ { 1 } f } \\prod _ { k = 1 } ^ { \\infty } "
        "\\bigl ( 1 - q ^ { k } \\bigr )",
        "\\sqrt { \\frac { a } { b } } \\leq \\sum _ { n } \\binom { n } { k }",
    ]
    tex = [detokenize(f) for f in formulas]
    a = render_results(tex, RenderOptions(workers=1, strict=True, style=style))
    b = render_results(tex, RenderOptions(workers=1, strict=True, style=train_style(style)))
    for x, y in zip(a, b):
        assert x.image is not None and y.image is not None
        assert x.image.shape == y.image.shape and np.array_equal(x.image, y.image)


# sha256 of the val/test files' normalized lines ("! message" where normalizing fails), taken
# before issue 13's recovery: whatever recovery does, these labels must not move.
FIXED_SETS = {
    "val": "2ce858a1ef50dcfc71a53393a76cb2e356d6b4e392d3c82ead1e449cc3513c2d",
    "test": "44e16428cd1f0fdc43b0ecc00eb0bb03fa2f6a0b51f5685a0ce627529915204c",
}


@pytest.mark.parametrize("name", sorted(FIXED_SETS))
def test_fixed_val_and_test_sets_normalize_exactly_as_before(name):
    path = SHARED / "im2latex100k" / f"{name}.formulas.norm.txt"
    if not path.is_file():
        pytest.skip(f"{path} not here")
    out = []
    for line in read_lines(path):
        try:
            out.append(normalize(line))
        except NormalizeError as e:
            out.append(f"! {e}")
    assert hashlib.sha256("\n".join(out).encode()).hexdigest() == FIXED_SETS[name]


@needs_tex
def test_build_recovers_corpus_formulas_but_not_fixed_ones(tmp_path):
    report = build_dataset(["\\R ^ { 2 } + \\mathscr { L }", "\\RR ^ { 2 } + \\mathscr { L }"],
                           tmp_path, ratios=(1, 0, 0), fixed={"test": ["\\R + 1"]},
                           progress=False, render_opts=RenderOptions(workers=1))
    formulas = read_lines(tmp_path / "im2latex_formulas.norm.lst")
    assert "\\mathbb { R } ^ { 2 } + \\mathscr { L }" in formulas  # rendered in training
    assert "\\R + 1" in formulas  # the test label as given
    assert report.recovered == {"\\R": 1, "\\RR": 1}
    assert "recovered by rewriting                  2" in report.lines()
    assert report.dropped["duplicate after recovery"] == 1
    assert report.splits == {"  train": 1, "  validate": 0, "  test": 1}


@needs_tex
def test_build_without_recovery_drops_them_and_says_why(tmp_path):
    report = build_dataset(["\\R ^ { 2 } + x", "\\mathscr { L }"], tmp_path, ratios=(1, 0, 0),
                           progress=False, render_opts=RenderOptions(workers=1), recovery=False)
    assert report.dropped["failed to render: Undefined control sequence."] == 2
    assert not report.recovered and report.splits["  train"] == 0
