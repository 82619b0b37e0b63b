"""data.image: the dataset look, user-image loading and scale normalization."""

import io

import numpy as np
import pytest
from PIL import Image

from data.image import (
    BUCKETS,
    MAX_PIXELS,
    ImageError,
    binarize,
    bucket_size,
    component_boxes,
    crop_to_ink,
    downsample,
    finish_render,
    ink_bbox,
    load_image,
    normalize_user_image,
    otsu_threshold,
    pad,
    pad_to_bucket,
    read_gray_png,
)
from tests.conftest import HAVE_TEX


def blank(h: int = 20, w: int = 30) -> np.ndarray:
    return np.full((h, w), 255, np.uint8)


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def glyph_page() -> np.ndarray:
    """Dark-on-white test picture: a bar and a block, with an anti-aliased (gray) edge."""
    img = blank(40, 60)
    img[10:30, 10:14] = 0
    img[10:30, 14] = 128
    img[20:24, 30:50] = 0
    return img


# ------------------------------------------------------------------- dataset pipeline


def test_buckets_match_design_doc():
    assert len(BUCKETS) == 21
    assert BUCKETS[0] == (120, 50) and BUCKETS[-1] == (800, 800)
    assert (360, 60) in BUCKETS and (400, 160) in BUCKETS


def test_crop_to_ink_finds_the_exact_box():
    img = glyph_page()
    assert ink_bbox(img) == (10, 30, 10, 50)
    assert crop_to_ink(img).shape == (20, 40)
    assert ink_bbox(img, threshold=100) == (10, 30, 10, 50)
    assert ink_bbox(blank()) is None
    with pytest.raises(ImageError):
        crop_to_ink(blank())


def test_pad_and_binarize():
    img = glyph_page()
    padded = pad(img, 8)
    assert padded.shape == (56, 76) and (padded[:8] == 255).all()
    b = binarize(img)
    assert set(np.unique(b)) == {0, 255}
    assert b[15, 14] == 0  # any non-white pixel is ink, as in the original dataset
    assert binarize(img, threshold=100)[15, 14] == 255


def test_downsample_floors_sizes_and_uses_lanczos():
    img = blank(41, 61)
    img[20:22, 30:32] = 0
    small = downsample(img, 2)
    assert small.shape == (20, 30)
    # LANCZOS leaves gray levels (and slight ringing), a box filter would not ring
    assert small.min() < 128 and len(np.unique(small)) > 3
    assert (downsample(img, 1) == img).all()


def test_bucket_placement_top_left_white_fill():
    img = np.zeros((30, 100), np.uint8)
    assert bucket_size(100, 30) == (120, 50)
    assert bucket_size(130, 30) == (160, 40)
    assert bucket_size(130, 30, scale=2) == (240, 100)
    out = pad_to_bucket(img)
    assert out.shape == (50, 120)
    assert (out[:30, :100] == 0).all() and (out[30:] == 255).all() and (out[:, 100:] == 255).all()


def test_image_larger_than_every_bucket_is_kept_as_is():
    img = np.zeros((900, 100), np.uint8)
    assert bucket_size(100, 900) is None
    assert pad_to_bucket(img).shape == (900, 100)


def test_finish_render_is_crop_pad_bucket_halve():
    page = blank(400, 600)
    page[100:140, 200:400] = 0
    out = finish_render(page, pad_px=8, factor=2, bucket=False)
    assert out.shape == ((40 + 16) // 2, (200 + 16) // 2)
    page[100, 400] = 0  # odd width: a white column is added, not a fractional scale
    assert finish_render(page).shape == ((40 + 16) // 2, (200 + 17 + 1) // 2)
    assert out[4:-4, 4:-4].max() < 50 and out[0].min() > 240  # ink starts after the pad
    assert finish_render(page, bucket=True).shape == (50, 120)


# ------------------------------------------------------------------------- loading


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16", "CMYK"])
def test_load_image_modes_give_dark_on_white(mode):
    src = Image.fromarray(glyph_page())
    im = src.convert(mode) if mode != "I;16" else Image.fromarray(
        glyph_page().astype(np.uint16) * 257)
    if mode == "I;16":
        assert im.mode in ("I;16", "I")
    out = load_image(png_bytes(im, "TIFF" if mode == "CMYK" else "PNG"))
    assert out.dtype == np.uint8 and out.shape == (40, 60)
    assert out[0, 0] > 240 and out[15, 11] < 15


def test_load_image_composites_alpha_on_white():
    rgba = np.zeros((40, 60, 4), np.uint8)  # transparent black everywhere
    rgba[10:30, 10:14, 3] = 255  # opaque black bar
    out = load_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0] == 255 and out[15, 11] == 0


def test_load_image_light_ink_on_transparency_stays_visible():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 10:14] = (255, 255, 255, 255)  # white ink for a dark theme
    out = load_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0] > 240 and out[15, 11] < 15


def test_load_image_palette_with_transparency():
    p = Image.fromarray(glyph_page()).convert("P")
    p.info["transparency"] = int(np.asarray(p)[0, 0])  # background index transparent
    out = load_image(png_bytes(p))
    assert out[0, 0] > 240 and out[15, 11] < 15


def test_load_image_inverts_light_on_dark(tmp_path):
    path = tmp_path / "dark.jpg"
    Image.fromarray(255 - glyph_page()).convert("RGB").save(path, quality=95)
    out = load_image(path)
    assert out[0, 0] > 230 and out[15, 11] < 40


def test_load_image_errors_name_the_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(text)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(Image.fromarray(glyph_page()))[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(truncated)
    with pytest.raises(ImageError, match="upload"):
        load_image(b"\x89PNG garbage", name="upload")


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 7000), 1).save(path)  # 56 MP, a few kB on disk
    assert 8000 * 7000 > MAX_PIXELS
    with pytest.raises(ImageError, match="bomb.png.*larger than"):
        load_image(path)
    with pytest.raises(ImageError, match="larger than"):
        read_gray_png(path)
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_PIXELS  # untouched


def test_read_gray_png(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(glyph_page()).convert("RGB").save(path)
    img = read_gray_png(path)
    assert img.shape == (40, 60) and img.dtype == np.uint8 and img[15, 11] == 0
    with pytest.raises(ImageError, match="nope.png"):
        read_gray_png(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageError, match="bad.png"):
        read_gray_png(bad)


# ------------------------------------------------------------------ normalization


def test_otsu_threshold_splits_two_levels():
    img = np.full((10, 10), 220, np.uint8)
    img[2:5, 2:8] = 40
    t = otsu_threshold(img)
    assert 40 < t <= 220
    assert ((img < t) == (img == 40)).all()


def test_component_boxes_counts_diagonal_neighbours():
    mask = np.zeros((12, 12), bool)
    mask[1:4, 1:3] = True  # 3x2
    mask[4, 3] = True  # touches the first diagonally
    mask[7:12, 7:9] = True  # 5x2, separate
    boxes = sorted(map(tuple, component_boxes(mask)))
    assert boxes == [(1, 1, 4, 3), (7, 7, 5, 2)]
    assert component_boxes(np.zeros((3, 3), bool)).shape == (0, 4)
    u = np.zeros((6, 7), bool)  # a U: two runs that merge lower down
    u[0:5, 0] = u[0:5, 6] = u[5, 0:7] = True
    assert component_boxes(u).tolist() == [[0, 0, 6, 7]]


def test_normalize_blank_image_is_an_error():
    with pytest.raises(ImageError):
        normalize_user_image(blank())


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_normalize_user_image_recovers_the_training_scale():
    from data.render import render_formulas

    # The scale estimate is statistical (glyph mix): ~15% typical error, hence the bounds.
    formula = r"\int _ { 0 } ^ { \infty } e ^ { - x ^ { 2 } } d x = \frac { \sqrt { \pi } } { 2 }"
    (render,) = render_formulas([formula])
    assert render is not None
    h, w = render.shape
    big = np.asarray(Image.fromarray(render).resize((w * 3, h * 3), Image.Resampling.BICUBIC))
    screenshot = 255 - np.pad(big, ((40, 90), (120, 60)), constant_values=255)  # dark mode
    user = load_image(png_bytes(Image.fromarray(screenshot).convert("RGB")))
    assert user[0, 0] > 240  # inverted back to dark on white
    out = normalize_user_image(user)
    assert 0.8 < out.shape[0] / h < 1.2 and 0.8 < out.shape[1] / w < 1.2
    assert out[:2].min() > 200 and out[:, :2].min() > 200  # margins gone, 8 px pad back
    speckled = user.copy()
    speckled[3:5, 3:5] = 0  # dust in the margin is not part of the formula
    assert normalize_user_image(speckled).shape == out.shape
    ink = np.argwhere(out < 128)
    assert 2 <= ink[:, 0].min() <= 6 and 2 <= ink[:, 1].min() <= 6
    bucketed = normalize_user_image(user, bucket=True)
    assert (bucketed.shape[1], bucketed.shape[0]) in BUCKETS


# ------------------------------------------------------------- scale estimate (issue 12)

# Letter mixes that one box statistic gets wrong: x-height letters, capitals and digits,
# big operators with scripts (the legacy glyph_size estimate misses the 8% bound on them).
SCALE_FORMULAS = [r"a x ^ { 2 } + b x + c = 0", r"\alpha \beta \gamma = 3 5 7 \, A B C",
                  r"\sum _ { n = 1 } ^ { N } \frac { 1 } { n ^ { 2 } } < "
                  r"\frac { \pi ^ { 2 } } { 6 }"]


def test_estimate_scale_follows_a_rescaling_of_the_boxes():
    from data.glyph_scale import build_template, estimate_scale

    rng = np.random.default_rng(0)
    boxes = np.zeros((40, 4), np.int64)
    boxes[:, 2] = rng.choice([6, 9, 10, 14], 40)  # heights of x-height, cap and tall glyphs
    boxes[:, 3] = rng.integers(4, 12, 40)
    template = build_template([(boxes, 1.0)])
    assert estimate_scale(boxes, template) == pytest.approx(1.0, abs=0.02)
    doubled = boxes * np.array([1, 1, 2, 2])
    assert estimate_scale(doubled, template) == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError):
        estimate_scale(boxes[:0], template)


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
@pytest.mark.parametrize("factor", [1.0, 1.7, 3.0])
def test_estimate_scale_within_8_percent_on_rescaled_renders(factor):
    from data.image import analyse, estimate_scale
    from data.render import render_formulas

    for formula, render in zip(SCALE_FORMULAS, render_formulas(SCALE_FORMULAS)):
        assert render is not None
        h, w = render.shape
        big = np.asarray(Image.fromarray(render).resize(
            (round(w * factor), round(h * factor)), Image.Resampling.LANCZOS))
        ratio = estimate_scale(analyse(big)[3]) / factor
        assert abs(np.log(ratio)) < np.log(1.08), (formula, factor, ratio)


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_renders_at_training_scale_pass_through_unresampled():
    from data.image import TRAINING_SCALE_RANGE, analyse, estimate_scale
    from data.render import render_formulas

    for render in render_formulas(SCALE_FORMULAS):
        assert TRAINING_SCALE_RANGE[0] < estimate_scale(analyse(render)[3]) < \
            TRAINING_SCALE_RANGE[1]
        # passed through: the same ink, pixel for pixel, only cropped and re-padded
        out = crop_to_ink(normalize_user_image(render), threshold=250)
        ref = crop_to_ink(render, threshold=250)
        assert out.shape == ref.shape and (out == ref).all()


# Close glyphs and scripts, whose halos merge under a blur.
BLUR_FORMULAS = [r"[ \bar{K}_a^-(p), \bar{K}_b^-(k) ] = i f_{abc} \bar{K}_c^-(p+k)",
                 r"E(v)=\frac{d}{dt}E(q) \forall t ."]


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_a_blurred_render_keeps_the_training_scale():
    """Otsu's mask of a blurred image carries a halo that made blurred renders look up to 1.7x
    larger, so they were shrunk; the halo-free mask keeps them at the training scale."""
    from data.degrade import blur
    from data.render import render_formulas

    for formula, render in zip(BLUR_FORMULAS, render_formulas(BLUR_FORMULAS)):
        assert render is not None
        sharp, blurred = normalize_user_image(render), normalize_user_image(blur(render, 1.0))
        assert abs(np.log(blurred.shape[1] / sharp.shape[1])) < np.log(1.1), formula



@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_a_blurred_render_is_sharpened_and_renders_anti_aliased_or_noisy_are_not(monkeypatch):
    """A render blurred by a 1-px radius is sharpened before it is read: its edges climb over
    several pixels, and the model reads the sharpened image far better. A render, the same
    formula anti-aliased at 100 dpi and a noisy render are read as they were."""
    from data import image
    from data.degrade import blur, gaussian_noise
    from data.render import RenderOptions, render_formulas

    def steepness(img: np.ndarray) -> float:
        return image._steepness(img, (255.0, float(img.min())))

    renders = render_formulas(BLUR_FORMULAS)
    blurred = [blur(r, 1.0) for r in renders]
    sharpened = [normalize_user_image(b) for b in blurred]
    others = [*renders, *render_formulas(BLUR_FORMULAS, RenderOptions(style="cm-aa")),
              *(gaussian_noise(r, np.random.default_rng(0), 15.0) for r in renders)]
    read = [normalize_user_image(x) for x in others]
    monkeypatch.setattr(image, "_BLURRED_STEEPNESS", 0.0)  # nothing counts as blurred
    for b, s in zip(blurred, sharpened):
        assert steepness(s) > steepness(normalize_user_image(b)) + 0.05
    assert all(np.array_equal(x, normalize_user_image(o)) for x, o in zip(read, others))


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_a_hard_edged_image_at_the_training_scale_gets_the_renders_soft_edges():
    """A binary image (a 100-dpi render, a thresholded scan) at the training scale goes the
    resample path, whose LANCZOS halving gives it the gray edges every training render has;
    a render already has them and is passed through."""
    from data.render import render_formulas

    for render in render_formulas(BLUR_FORMULAS):
        hard = np.where(render < 128, 0, 255).astype(np.uint8)
        out = normalize_user_image(hard)
        gray = ((out > 40) & (out < 215)).sum() / (out < 128).sum()
        assert gray > 0.1
        assert abs(np.log(out.shape[1] / normalize_user_image(render).shape[1])) < np.log(1.1)


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_an_anti_aliased_render_gets_a_second_reading_at_the_training_scale():
    """Otsu's mask breaks the thin gray strokes of a render anti-aliased at the training
    resolution into small pieces, and normalization enlarged it ~3x; the second reading, from
    a mask near the paper, keeps it at its size. A render in the training look has one."""
    from data.image import normalized_readings
    from data.render import RenderOptions, render_formulas

    formula = r"R:\alpha^{\prime}M^{2}=-1,0,1,2,3,..........."
    aa, = render_formulas([formula], RenderOptions(style="cm-aa"))
    first, second = normalized_readings(aa)
    assert np.array_equal(first, normalize_user_image(aa))
    assert first.shape[1] > 1.5 * aa.shape[1]  # Otsu's reading: enlarged
    assert abs(np.log(second.shape[1] / aa.shape[1])) < np.log(1.1)
    clean, = render_formulas([formula])
    assert len(normalized_readings(clean)) == 1


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_a_small_soft_image_is_enlarged_without_breaking_its_strokes():
    """A 0.6x render's thin strokes never reach full ink; cut at half ink after the
    enlargement they broke into more pieces than the render has (the fraction bar, the
    norm bars, the sum's serifs). The cut nearer the paper keeps them whole."""
    from data.degrade import rescale
    from data.render import render_formulas

    formulas = [r"E(v)=\frac{d}{dt}E(q) \forall t .", r"\sum_{n=1}^{N} a_{n} \leq \| f \|_{2}"]
    for formula, render in zip(formulas, render_formulas(formulas)):
        small = normalize_user_image(rescale(render, 0.6))
        assert small.shape[1] > 0.85 * render.shape[1], formula  # enlarged
        pieces = len(component_boxes(small < 128))
        assert pieces <= len(component_boxes(normalize_user_image(render) < 128)), formula


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_an_image_at_the_low_edge_of_the_window_is_also_read_resampled_and_judged_evenly():
    """Shrunk to 0.8x, a render is estimated at 0.84-0.86, inside the pass-through window, and
    was read a fifth small. It gets a second reading enlarged to about the render's size, and
    the model judges the two evenly. The render itself has one reading."""
    from data.degrade import rescale
    from data.image import normalized_readings
    from data.render import render_formulas

    for formula, render in zip(SCALE_FORMULAS[:2], render_formulas(SCALE_FORMULAS[:2])):
        small = rescale(render, 0.8)
        readings = normalized_readings(small)
        assert len(readings) == 2 and readings.even, formula
        first, second = readings
        assert np.array_equal(first, normalize_user_image(small))  # passed through, small
        assert first.shape[1] < 0.85 * render.shape[1], formula
        assert abs(np.log(second.shape[1] / render.shape[1])) < np.log(1.1), formula
        once = normalized_readings(render)
        assert len(once) == 1 and not once.even


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_a_small_image_whose_glyphs_merge_gets_a_second_reading_enlarged():
    """Shrunk to 0.6x, close glyphs share gray pixels that Otsu's mask counts as ink: the
    merged boxes look training-size and the image was passed through small. The midpoint mask
    separates them, and the second reading is enlarged to about the render's size. The render
    itself has one reading."""
    from data.degrade import rescale
    from data.image import normalized_readings
    from data.render import render_formulas

    render, = render_formulas([r"g_{ij}=\bar{g}_{ij}+h_{ij},"])
    small = rescale(render, 0.6)
    first, second = normalized_readings(small)
    assert np.array_equal(first, normalize_user_image(small))
    assert first.shape[1] < 0.75 * render.shape[1]  # Otsu's reading: left small
    assert abs(np.log(second.shape[1] / render.shape[1])) < np.log(1.3)
    assert len(normalized_readings(render)) == 1
