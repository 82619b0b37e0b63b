"""data.styles and render styles: each style draws a formula differently, cm is untouched,
preprocess.py --styles writes the extra images for training only, bad names fail clearly."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest

from data import render as R
from data.build import image_name, image_stem
from data.layout import FORMULAS_FILE, IMAGES_DIR, read_lines, split_file
from data.render import RenderOptions, render_formulas
from data.styles import (
    DEFAULT_STYLE,
    GREEK_CAPITALS,
    STYLES,
    Style,
    get_style,
    parse_style_weights,
    parse_styles,
    styles_for,
)
from data.tex_document import Geometry, make_document
from tests.conftest import HAVE_TEX, run_script

needs_tex = pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")

FORMULA = (r"\sum _ { i = 1 } ^ { n } \frac { \alpha _ { i } } { \sqrt { b } } + x ^ { 2 }"
           r" \text { if } y")
FAST = RenderOptions(workers=1, formula_timeout_s=2.0, timeout_s=60)


@pytest.fixture(scope="module")
def rendered() -> dict[str, np.ndarray]:
    """FORMULA in every registered style, one TeX run each."""
    out = {}
    for name in STYLES:
        (img,) = render_formulas([FORMULA], replace(FAST, style=name))
        assert img is not None, name
        out[name] = img
    return out


def ink_box(img: np.ndarray) -> tuple[int, int]:
    """Height and width of the pixels clearly darker than paper."""
    rows, cols = np.nonzero(img < 200)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@needs_tex
def test_every_style_draws_the_formula_differently_at_a_similar_size(rendered):
    cm = rendered[DEFAULT_STYLE]
    ch, cw = ink_box(cm)
    for name, img in rendered.items():
        if name == DEFAULT_STYLE:
            continue
        differs = img.shape != cm.shape or np.abs(img.astype(int) - cm).sum() > 255 * 20
        assert differs, f"{name} looks like cm"
        h, w = ink_box(img)
        assert 0.5 * ch <= h <= 1.25 * ch and 0.7 * cw <= w <= 1.25 * cw, (name, h, w, ch, cw)


@needs_tex
def test_each_variation_changes_what_it_names(rendered):
    cm_h, cm_w = ink_box(rendered["cm"])
    assert ink_box(rendered["cm-text"])[0] < 0.8 * cm_h  # sum limits beside, small fraction
    area = {n: np.prod(ink_box(rendered[n])) for n in ("cm-10pt", "cm-11pt", "cm")}
    assert area["cm-10pt"] < area["cm-11pt"] < area["cm"]

    def gray_share(img: np.ndarray) -> float:  # of the non-paper pixels, how many are gray
        ink = img[img < 250]
        return float(((ink > 60) & (ink < 200)).mean())

    assert gray_share(rendered["cm-aa"]) > gray_share(rendered["cm"]) + 0.1
    assert gray_share(rendered["times-aa"]) > gray_share(rendered["times"]) + 0.1
    assert gray_share(rendered["palatino-aa"]) > gray_share(rendered["palatino"]) + 0.1

    def darkness(img: np.ndarray) -> float:  # ink per unit of box: stroke weight
        return float((255 - img.astype(float)).sum() / np.prod(ink_box(img)))

    # Binarized at the output resolution strokes are bolder; at 300 dpi, lighter.
    assert darkness(rendered["cm-100dpi"]) > darkness(rendered["cm"]) > darkness(
        rendered["cm-300dpi"])


@needs_tex
def test_cm_is_the_default_and_unchanged(rendered):
    assert RenderOptions().style == DEFAULT_STYLE == "cm"
    historic = "\\documentclass[12pt]{article}\n\\pagestyle{empty}\n\\usepackage[cmex10]{amsmath}\n"
    assert get_style("cm").preamble() == historic == R.PREAMBLE
    document = make_document([FORMULA], "n", Geometry(), 200, get_style("cm"))
    assert "\\textstyle" not in document and "sansmath" not in document
    (plain,) = render_formulas([FORMULA], FAST)
    (named,) = render_formulas([FORMULA], FAST, style="cm")
    assert plain.shape == named.shape == rendered["cm"].shape
    assert (plain == named).all() and (plain == rendered["cm"]).all()


@needs_tex
def test_text_font_styles_set_math_letters_in_the_font_but_leave_mathsf_alone():
    """bookman and the other text-font styles change the math letters and digits, which is
    their point, and not \\mathsf, whose sans look the label names."""
    letters, sans = r"x y + 2 a", r"\mathsf { A B }"
    for name in ("bookman", "charter"):
        cm_letters, cm_sans = render_formulas([letters, sans], FAST)
        font_letters, font_sans = render_formulas([letters, sans], FAST, style=name)
        assert (cm_letters.shape != font_letters.shape
                or np.abs(cm_letters.astype(int) - font_letters).sum() > 255 * 20), name
        assert cm_sans.shape == font_sans.shape and (cm_sans == font_sans).all(), name


def _stem_share(img: np.ndarray) -> float:
    """The longest vertical run of ink in any column, as a share of the glyph's height: a
    square bracket's straight stem spans it all, a parenthesis's curve at most ~0.9."""
    ink = img < 128
    glyph = ink[ink.any(axis=1)]
    best = 0
    for column in glyph.T:
        run = 0
        for v in column:
            run = run + 1 if v else 0
            best = max(best, run)
    return best / len(glyph)


@needs_tex
def test_every_style_draws_square_brackets_square():
    """The label says [ where the image shows it: URW Gothic (avant) draws its brackets as
    parentheses, so that style takes them from another font. Parentheses stay curved."""
    for name in STYLES:
        left, right, paren = render_formulas(["[", "]", "("], FAST, style=name)
        assert _stem_share(left) >= 0.9 and _stem_share(right) >= 0.9, name
        assert _stem_share(paren) < 0.9, name


def _has_solid_block(img: np.ndarray, h: int = 5, w: int = 4) -> bool:
    """Whether an h x w block of the image is all ink: no glyph of these formulas is that
    solid at the training scale, the filled box a virtual font draws for a missing glyph is."""
    ink = np.pad((img < 128).astype(np.int32), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    block = ink[h:, w:] - ink[:-h, w:] - ink[h:, :-w] + ink[:-h, :-w]
    return bool((block == h * w).any())


@needs_tex
def test_every_style_draws_the_greek_capitals():
    """The psnfss text fonts have no Greek: with sansmath pointing math at them, every capital
    came out as one black box under eleven labels. The styles take them from cm (a test that
    fails on the styles before that fix)."""
    capitals = [rf"\{name}" for name in GREEK_CAPITALS]
    for name in STYLES:
        for tex, img in zip(capitals, render_formulas(capitals, FAST, style=name)):
            assert img is not None, (name, tex)
            assert not _has_solid_block(img), (name, tex)
    (box,) = render_formulas([r"\rule { 1 em } { 1 ex }"], FAST)
    assert _has_solid_block(box)  # the detector sees a filled box


def test_a_corrected_style_gets_new_image_names():
    """Images on disk are reused by name when a build reruns: a style whose look was corrected
    (Style.revision) must not reuse the files of its old look."""
    assert image_name("abc", "cm") == "abc.png"
    assert image_name("abc", "times") == "abc_times.png"  # older builds keep their images
    assert get_style("avant").revision == 2
    assert image_name("abc", "avant") == "abc_avant.r2.png"
    assert image_name("abc", "bookman") == "abc_bookman.r1.png"


def test_unknown_style_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown render style 'tims'.*cm, times"):
        RenderOptions(style="tims")
    with pytest.raises(ValueError, match="unknown render style"):
        parse_styles("cm,tims")
    with pytest.raises(ValueError, match="no render style"):
        parse_styles(" , ")
    assert parse_styles("cm, times,cm") == ["cm", "times"]
    odd = RenderOptions(style=Style("odd", dpi=150))  # 150 dpi: no integer shrink to 100
    with pytest.raises(ValueError, match="no integer multiple"):
        R.effective_options(odd)


def test_styles_per_formula_are_seeded_spread_and_bounded():
    styles = ["cm", "times", "palatino", "euler", "cm-aa"]
    formulas = [f"x _ {{ {i} }}" for i in range(400)]
    picks = [styles_for(f, styles, 1) for f in formulas]
    assert all(p[0] == "cm" and len(p) == 2 and p[1] in styles[1:] for p in picks)
    counts = {s: sum(p[1] == s for p in picks) for s in styles[1:]}
    assert min(counts.values()) > 60, counts  # about 100 each
    assert picks == [styles_for(f, styles, 1) for f in formulas]  # resumable: same choice
    assert picks != [styles_for(f, styles, 1, seed=1) for f in formulas]
    assert styles_for("x", styles, 0) == ["cm"] and styles_for("x", ["cm"], 3) == ["cm"]
    two = styles_for("x", styles, 2)
    assert len(two) == 3 and len(set(two)) == 3


def test_unweighted_styles_are_the_ones_earlier_builds_picked():
    """A rebuild without weights must pick what the old hash order picked, or every extra
    image on disk would be rendered again and the data would change."""
    styles = list(STYLES)
    for extra in (1, 2):
        for i in range(300):
            f = f"x ^ {{ {i} }}"
            old = sorted(styles[1:], key=lambda s: hashlib.sha1(
                f"0\0{s}\0{f}".encode()).digest())[:extra]
            assert styles_for(f, styles, extra) == [styles[0], *old]
            assert styles_for(f, styles, extra, weights={s: 1.0 for s in styles}) == \
                [styles[0], *old]


def test_style_weights_set_each_styles_share():
    styles = ["cm", "times", "avant", "bookman"]
    weights = {"avant": 3.0, "bookman": 2.0}
    formulas = [f"y _ {{ {i} }}" for i in range(3000)]
    picks = [styles_for(f, styles, 1, weights=weights)[1] for f in formulas]
    share = {s: picks.count(s) / len(picks) for s in styles[1:]}
    for s, expected in (("times", 1 / 6), ("avant", 3 / 6), ("bookman", 2 / 6)):
        assert abs(share[s] - expected) < 0.03, share
    two = [styles_for(f, styles, 2, weights=weights) for f in formulas[:200]]
    assert all(len(set(p)) == 3 and p[0] == "cm" for p in two)  # still without replacement


def test_parse_style_weights():
    assert parse_style_weights("cm, times,avant:3 ,bookman:0.5,times:9") == {
        "cm": 1.0, "times": 1.0, "avant": 3.0, "bookman": 0.5}
    assert parse_styles("cm,avant:3") == ["cm", "avant"]
    assert parse_style_weights("cm:1,times")["cm"] == 1.0
    for text, message in (("cm,avant:0", "positive"), ("cm,avant:-1", "positive"),
                          ("cm,avant:nan", "positive"), ("cm,avant:inf", "positive"),
                          ("cm,avant:x", "not a number"), ("cm:2,times", "first style"),
                          ("cm,avnt:2", "unknown render style")):
        with pytest.raises(ValueError, match=message):
            parse_style_weights(text)


@needs_tex
def test_preprocess_styles_adds_training_images_only(tmp_path):
    d = tmp_path / "ds"
    args = ["--generate", "24", "--data_path", d, "--quiet", "--no_shards", "--workers", "1",
            "--split_ratio", "0.6", "0.2", "0.2", "--styles", "cm,times,cm-aa"]
    run_script("preprocess.py", *args)
    formulas = read_lines(d / FORMULAS_FILE)
    rows = {s: [ln.split() for ln in read_lines(d / split_file(s))]
            for s in ("train", "validate", "test")}
    train = {}
    for name, idx in rows["train"]:
        train.setdefault(int(idx), []).append(name)
    assert train and all(len(names) == 2 for names in train.values())
    for idx, names in train.items():
        stem = image_stem(formulas[idx])
        assert names[0] == f"{stem}.png"
        assert names[1] in (f"{stem}_times.png", f"{stem}_cm-aa.png")
    for split in ("validate", "test"):
        assert rows[split] and all("_" not in name for name, _ in rows[split])
    images = sorted((d / IMAGES_DIR).glob("*.png"))
    assert len(images) == sum(map(len, rows.values()))
    before = {p: p.stat().st_mtime_ns for p in images}
    run_script("preprocess.py", *args)  # a rerun renders nothing again
    assert {p: p.stat().st_mtime_ns for p in images} == before


@needs_tex
def test_preprocess_style_weights_reach_the_build(tmp_path):
    d = tmp_path / "ds"
    run_script("preprocess.py", "--generate", "12", "--data_path", d, "--quiet", "--no_shards",
               "--workers", "1", "--split_ratio", "1", "0", "0",
               "--styles", "cm,times,cm-aa:1e6")
    extra = [ln.split()[0] for ln in read_lines(d / split_file("train")) if "_" in ln.split()[0]]
    assert extra and all(name.endswith("_cm-aa.png") for name in extra)


def test_preprocess_unknown_style_is_a_one_line_error(tmp_path):
    p = run_script("preprocess.py", "--generate", "3", "--data_path", tmp_path / "o",
                   "--styles", "cm,tims", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        f"error: unknown render style 'tims'; valid: {', '.join(STYLES)}"]
    assert not (tmp_path / "o" / IMAGES_DIR).exists()
    p = run_script("preprocess.py", "--generate", "3", "--data_path", tmp_path / "o",
                   "--styles", "cm,times:0", check=False)
    assert p.returncode != 0 and "must be a positive number" in p.stderr
    assert not (tmp_path / "o" / IMAGES_DIR).exists()
