"""Edits between two readings, by kind (data/token_edits.py), and the robustness benchmark's
report of them (bench/robustness.py --errors)."""

from __future__ import annotations

import pytest

from bench import robustness
from data.token_edits import Edit, summarize, token_edits, token_kind
from im2latex.prediction import Prediction


@pytest.mark.parametrize("token,kind", [
    ("\\bar", "accent"), ("\\widetilde", "accent"), ("\\tilde", "accent"),
    ("\\cal", "font"), ("\\mathrm", "font"), ("\\mathbb", "font"),
    ("\\left(", "sized delimiter"), ("\\right.", "sized delimiter"), ("\\Big", "sized delimiter"),
    ("\\leftarrow", "glyph"), ("\\rightarrow", "glyph"), ("\\bigcup", "glyph"),
    ("^", "script"), ("_", "script"), ("{", "braces"), ("x", "glyph"), ("\\alpha", "glyph"),
])
def test_token_kinds(token, kind):
    assert token_kind(token) == kind


def test_edits_turn_one_reading_into_the_other():
    a = "\\bar { x } + { \\cal L } = \\left( a \\right)".split()
    b = "\\tilde { x } + L = ( a ) ^ { 2 }".split()
    edits = token_edits(a, b)
    assert [Edit(("\\bar",), ("\\tilde",))] == [e for e in edits if e.kind == "accent"]
    assert any(e.kind == "font" and "\\cal" in e.a and not e.b for e in edits)
    assert sorted(e.kind for e in edits).count("sized delimiter") == 2
    # the brace the font switch leaves stranded pairs with nothing, not with `{ 2 }`'s
    assert Edit(("}",), ()) in edits
    assert token_edits(a, a) == []


def test_summary_counts_kinds_tokens_and_edits():
    a = "\\bar { x } + \\mu".split()
    s = summarize([(a, "\\tilde { x } + p".split()), (a, "\\tilde { x } + \\mu".split()),
                   (a, a)])
    assert s.tokens == 3 * len(a)
    assert s.by_kind["accent"] == 2 and s.by_kind["glyph"] == 1
    assert s.tokens_by_kind["accent"] == 2 and sum(s.by_kind.values()) == 3
    assert s.edits.most_common(1) == [(Edit(("\\bar",), ("\\tilde",)), 2)]


def reading(latex: str) -> Prediction:
    return Prediction(latex=latex, score=-0.1)


def test_error_report_pairs_each_reading_with_the_same_formulas_clean_one():
    """Rows made from separate renders can miss different formulas: pairing goes by the
    formula's position, and refused images are left out, not counted as deletions."""
    refs = ["x", "y", "z"]
    clean = robustness.Row("clean", "", images=[()] * 3, refs=refs, ids=[0, 1, 2])
    small = robustness.Row("low_res", "", images=[(), None], refs=refs[1:], ids=[1, 2])
    other = robustness.Row("val_images", "", images=[()], refs=["x"])
    preds = [[reading("\\bar { x }"), reading("\\mu"), reading("z")],
             [reading("p"), None], [reading("q")]]
    report = robustness.error_report([clean, small, other], preds, top=5)
    assert "low_res: 1 edits from the clean readings of 1 formulas (1 tokens)" in report
    assert "\\mu  ->  p   [glyph]" in report
    assert "val_images" not in report  # other formulas: nothing to pair with


def test_errors_need_the_clean_row(capsys):
    assert robustness.main(["--conditions", "low_res", "--errors", "5"]) == 1
    assert "clean" in capsys.readouterr().err
