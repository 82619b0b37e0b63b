"""data/normalize.py: raw LaTeX -> normalized tokens -> compilable LaTeX."""

from __future__ import annotations

import pytest

from data.normalize import (
    NormalizeError,
    detokenize,
    normalize,
    restore_backslashes,
    strip_math_wrappers,
    tokenize,
)
from tests.conftest import SHARED

CASES = [
    # scripts get braces, other macro arguments keep their form (like the reference data)
    ("x^2", "x ^ { 2 }"),
    ("x_i^{2}", "x _ { i } ^ { 2 }"),
    ("x^12", "x ^ { 1 } 2"),
    ("x^\\alpha_\\mathrm{T}", "x ^ { \\alpha } _ { \\mathrm { T } }"),
    ("x^\\frac12", "x ^ { \\frac 1 2 }"),
    ("x^\\sqrt[3]{y}", "x ^ { \\sqrt [ 3 ] { y } }"),
    ("\\frac12", "\\frac 1 2"),
    ("\\frac{a}{b}", "\\frac { a } { b }"),
    # letters and digits are tokens, control sequences are tokens
    ("\\mathrm{sin}x", "\\mathrm { s i n } x"),
    ("3.14\\alpha\\beta", "3 . 1 4 \\alpha \\beta"),
    ("a\\,b\\;c\\!d", "a \\, b \\; c \\! d"),
    ("a\\ b", "a \\ b"),
    ("a--b", "a -- b"),
    # glued pairs
    ("\\left ( x \\right .", "\\left( x \\right."),
    ("\\left\\{ x \\right\\}", "\\left\\{ x \\right\\}"),
    ("\\left\\langle x\\right\\rangle", "\\left\\langle x \\right\\rangle"),
    ("\\leftarrow\\rightarrow", "\\leftarrow \\rightarrow"),
    ("\\begin {array}{cc} a&b\\\\c&d\\end{array}",
     "\\begin{array} { c c } a & b \\\\ c & d \\end{array}"),
    ("\\operatorname* {arg\\,max}", "\\operatorname* { a r g \\, m a x }"),
    ("\\hspace{1cm}", "\\hspace { 1 c m }"),
    # invisible things go
    ("$x$", "x"),
    ("$$ x $$", "x"),
    ("\\[x\\]", "x"),
    ("$x$,", "x ,"),
    ("\\begin{equation} x \\label{eq:1} \\end{equation}", "x"),
    ("a = b \\nonumber", "a = b"),
    ("a % comment\n + b", "a + b"),
    ("50\\%", "5 0 \\%"),
    # text mode keeps its spaces as ~
    ("x \\text{ if } y", "x \\text { ~ i f ~ } y"),
    ("\\mbox{a  b}", "\\mbox { a ~ b }"),
    ("\\text{for $x  y$ }", "\\text { f o r ~ $ x y $ ~ }"),
    ("\\text{\\LaTeX is}", "\\text { \\LaTeX i s }"),
    # \over becomes \frac, within its group or cell; \buildrel's \over is not a fraction
    ("{a \\over b}", "{ \\frac { a } { b } }"),
    ("1 + {a+1\\over b}", "1 + { \\frac { a + 1 } { b } }"),
    ("\\left( a \\over b \\right)", "\\left( \\frac { a } { b } \\right)"),
    ("\\begin{array}{c} a \\over b \\\\ c \\end{array}",
     "\\begin{array} { c } \\frac { a } { b } \\\\ c \\end{array}"),
    ("\\buildrel \\Delta \\over =", "\\buildrel \\Delta \\over ="),
    ("", ""),
]


@pytest.mark.parametrize("raw,expected", CASES)
def test_normalize_examples(raw, expected):
    assert normalize(raw) == expected
    assert tokenize(raw) == expected.split()


@pytest.mark.parametrize("raw,_", CASES)
def test_normalize_is_a_fixed_point_on_its_output(raw, _):
    once = normalize(raw)
    assert normalize(once) == once


def test_normalized_text_mode_keeps_its_separators():
    # spaces of an already normalized line separate tokens, even in text mode
    for line in ("\\textrm { w i t h } x", "\\mathrm { ~ a n d ~ }", "a \\ b \\ \\ c"):
        assert normalize(line) == line


def test_control_space_token_survives_split():
    tokens = tokenize("a\\ b")
    assert tokens == ["a", "\\", "b"]
    assert normalize("a\\ b").split() == tokens


@pytest.mark.parametrize("bad", ["{a", "a}", "\\frac{a}{b", "} {"])
def test_unbalanced_braces_raise(bad):
    with pytest.raises(NormalizeError, match="unbalanced braces"):
        normalize(bad)
    assert issubclass(NormalizeError, ValueError)


def test_escaped_braces_are_not_groups():
    assert normalize("\\{ a \\}") == "\\{ a \\}"
    assert normalize("\\left\\{ a \\right.") == "\\left\\{ a \\right."


def test_strip_math_wrappers_leaves_inner_dollars():
    assert strip_math_wrappers("  $x$ ") == "x"
    assert strip_math_wrappers("$a$ and $b$") == "$a$ and $b$"
    assert strip_math_wrappers("\\[ $x$ \\]") == "x"


@pytest.mark.parametrize("tokens,latex", [
    ("\\frac { a } { b }", "\\frac{a}{b}"),
    ("\\hspace { - 1 . 5 c m } x", "\\hspace{-1.5cm}x"),
    ("\\alpha b \\beta", "\\alpha b\\beta"),
    ("\\left\\langle a \\right\\rangle", "\\left\\langle a\\right\\rangle"),
    ("a \\ b", "a\\ b"),
    ("\\text { ~ i f ~ }", "\\text{~if~}"),
    ("\\begin{array} { c c } a & b \\end{array}", "\\begin{array}{cc}a&b\\end{array}"),
])
def test_detokenize(tokens, latex):
    assert detokenize(tokens) == latex
    assert detokenize(tokens.split()) == latex


@pytest.mark.parametrize("_,expected", CASES)
def test_detokenize_round_trips_through_normalize(_, expected):
    assert normalize(detokenize(expected)) == expected


def test_restore_backslashes():
    assert restore_backslashes("frac { 1 } { 3 }") == "\\frac { 1 } { 3 }".split()
    assert restore_backslashes("- sqrt { 2 } + pi") == "- \\sqrt { 2 } + \\pi".split()
    assert restore_backslashes(["x", "in", "A", "cup", "B"]) == ["x", "\\in", "A", "\\cup", "B"]
    # plain letters, words that are not commands, and commands already written stay
    for kept in ("s i n x", "a < 7 or a > 1", "( - inf , 2 )", "\\frac { 1 } { 2 }", "e ^ { x }"):
        assert restore_backslashes(kept) == kept.split()


NORM_FILES = ["im2latex100k/val.formulas.norm.txt", "im2latex100k/test.formulas.norm.txt"]


@pytest.mark.parametrize("name", NORM_FILES)
def test_reference_data_is_a_fixed_point(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    same = 0
    for line in lines:
        try:
            same += normalize(line) == line
        except NormalizeError:
            pass
    assert same / len(lines) >= 0.99


RENDER_CASES = ["x^2+y_i^{2}", "\\frac12 + {a \\over b}", "f(x) = \\text{ if } x > 0",
                "\\left( \\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array} \\right)",
                "\\hspace{1.5cm} x \\kern-.2em y", "\\mathrm{sin}\\,\\theta \\quad 3.14"]


def test_normalized_form_renders_like_the_raw_one():
    render = pytest.importorskip("data.render").render_formulas
    raw = render(RENDER_CASES)
    norm = render([detokenize(normalize(f)) for f in RENDER_CASES])
    for f, a, b in zip(RENDER_CASES, raw, norm):
        assert a is not None and b is not None, f
        assert a.shape == b.shape and (a == b).all(), f
