"""Image processing shared by the renderer, the dataset preprocessor and inference.

Every function takes and returns the in-memory convention of docs/design.md: a ``uint8``
array of shape ``(H, W)``, white background (255), dark ink. The functions are pure: they
never modify their input.

The IM2LATEX-100K look (Deng et al.'s im2markup preprocessing) is, in the 200 dpi render's
pixel space: every non-white pixel black, crop to the ink, pad 8 px, paste at the top-left of
the smallest bucket (buckets are in output pixels, so x2 here), then halve with LANCZOS.
``finish_render`` is exactly that chain; the renderer and ``normalize_user_image`` both end
with it so that user images look like training images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from data import glyph_scale

# (width, height) after the x2 downsampling, smallest first; see docs/design.md.
BUCKETS: tuple[tuple[int, int], ...] = (
    (120, 50), (160, 40), (200, 40), (200, 50), (240, 40), (240, 50), (280, 40), (280, 50),
    (320, 40), (320, 50), (360, 40), (360, 50), (360, 60), (360, 100), (400, 50), (400, 160),
    (500, 100), (500, 200), (600, 100), (800, 100), (800, 800),
)

# The file suffixes (lower case) taken for images where a folder is searched for them.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_PIXELS = 50_000_000

# glyph_size of rendered formulas in output pixels (12pt at 200 dpi, halved): the median over
# IM2LATEX-100K test formulas rendered at 600 dpi (close to a sharp screenshot), divided by 3.
# The scale used to be this over a user image's glyph_size; it now only converts MIN_GLYPH_SIZE
# into the smallest scale (the legacy estimate in bench/scale_estimate.py uses it too).
REFERENCE_GLYPH_SIZE = 9.0

# An image whose estimated scale (data.glyph_scale, relative to the training renders) is
# inside this range is taken to be at the training scale already and is not resampled: the
# resample-and-threshold round trip moves edges by a pixel, which costs the model more than a
# small scale error. Renders at scale 1 are estimated well inside it
# (docs/results/scale_estimate.txt).
TRAINING_SCALE_RANGE = (0.8, 1.2)

# User images are analysed at most this large (a formula at training scale is ~800 px wide).
_ANALYSIS_SIDE = 2400

# The smallest glyph_size a readable formula can have: the smallest legible pixel fonts draw a
# letter in 3x5 px, and below that strokes merge. Smaller "glyphs" (dots, noise, dust) are not
# magnified further, because the resampling cost grows with the square of the factor: without
# this, a 1-px dot pattern was upscaled 18x. The scale is therefore at most
# REFERENCE_GLYPH_SIZE / MIN_GLYPH_SIZE = 3x in output pixels.
MIN_GLYPH_SIZE = 3.0

# Component analysis (pure Python over ink runs) refuses masks beyond these. A formula image
# is mostly paper: real formulas stay about two orders of magnitude below both caps (even
# photographed at the analysis size, with a dusty scan's specks), noise and halftone far above
# them. docs/results/fuzz_images.txt has the measured figures.
MAX_INK_RUNS = 100_000
MAX_INK_COMPONENTS = 5_000

# The encoder's smallest input (model/encoder.py: two 2x2 pools with padding, a (2, 1) pool and
# an unpadded 3x3 convolution); a thinner image is padded with paper up to it.
MIN_HEIGHT, MIN_WIDTH = 18, 6


class ImageError(ValueError):
    """An image that cannot be used; the message names the file so a batch job can say which."""


class Readings(tuple):
    """One image's model inputs (or normalized images), the first the default reading, the
    others alternatives where its glyph scale is ambiguous (normalized_readings).

    ``even``: the pixels favour no reading (an image at the low edge of the pass-through
    window, _resampled), so the model's surest reading wins. Otherwise an alternative is a long
    shot that the model must read much more surely (im2latex.api.SECOND_READING_MARGIN). A
    tuple, so that code that only decodes the images needs no change."""

    even: bool

    def __new__(cls, images, even: bool = False) -> Readings:
        self = super().__new__(cls, images)
        self.even = even
        return self


def ink_bbox(img: np.ndarray, threshold: int = 255) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), half-open, of the pixels darker than ``threshold``.

    The default counts every non-white pixel as ink, as the original cropping did.
    """
    ink = img < threshold
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_ink(img: np.ndarray, threshold: int = 255) -> np.ndarray:
    """Crop to the ink; a blank image has nothing to show a model, so it is an error."""
    box = ink_bbox(img, threshold)
    if box is None:
        raise ImageError("image has no ink")
    top, bottom, left, right = box
    return img[top:bottom, left:right]


def pad(img: np.ndarray, n: int) -> np.ndarray:
    """White border of ``n`` px on every side."""
    return np.pad(img, n, mode="constant", constant_values=255)


def binarize(img: np.ndarray, threshold: int = 255) -> np.ndarray:
    """Pixels darker than ``threshold`` become black, the rest white.

    With the default every non-white pixel turns black: the original pipeline got that by
    rendering with an alpha channel and then dropping it, which makes strokes slightly bold.
    """
    return np.where(img < threshold, 0, 255).astype(np.uint8)


def downsample(img: np.ndarray, factor: int = 2) -> np.ndarray:
    """Shrink by ``factor`` with LANCZOS, flooring odd sizes as the original did."""
    if factor == 1:
        return img.copy()
    h, w = img.shape
    size = (max(1, w // factor), max(1, h // factor))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def bucket_size(width: int, height: int, scale: int = 1) -> tuple[int, int] | None:
    """Smallest bucket (in ``scale``-times output pixels) holding the size, None if none does."""
    for bw, bh in BUCKETS:
        if width <= bw * scale and height <= bh * scale:
            return bw * scale, bh * scale
    return None


def pad_to_bucket(img: np.ndarray, scale: int = 1) -> np.ndarray:
    """Place the image at the top-left of its bucket, white elsewhere.

    An image larger than every bucket is returned unchanged (as the original preprocessing
    kept it): dropping it silently would lose data, and callers that need a bucket can test
    ``bucket_size`` themselves.
    """
    h, w = img.shape
    size = bucket_size(w, h, scale)
    if size is None:
        return img.copy()
    out = np.full((size[1], size[0]), 255, np.uint8)
    out[:h, :w] = img
    return out


def finish_render(
    page: np.ndarray, pad_px: int = 8, factor: int = 2, bucket: bool = False,
    binary: bool = True,
) -> np.ndarray:
    """A rasterized page (at ``factor`` x the output resolution) in the dataset's look.

    Without a bucket the canvas is first widened to a multiple of ``factor`` (white at the
    right and bottom), so the halving is exact and the pixels equal the bucketed image's.
    ``binary=False`` keeps the rasterizer's anti-aliasing (how screen renderers draw) instead
    of the dataset's every-gray-is-black look.
    """
    img = crop_to_ink(page)  # crop first: same result, less work
    img = pad(binarize(img) if binary else img, pad_px)
    if bucket:
        img = pad_to_bucket(img, scale=factor)
    else:
        h, w = img.shape
        img = np.pad(img, ((0, -h % factor), (0, -w % factor)), constant_values=255)
    return downsample(img, factor)


# ---------------------------------------------------------------------------- file input


# What a user can hand over: a file (path or its bytes), or an image already in memory.
ImageSource = str | Path | bytes | Image.Image | np.ndarray


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    """An array as the image a file holding it decodes to: H x W gray or H x W x 3/4 RGB(A),
    uint8, or float in [0, 1] (scikit-image's convention), so it takes the files' path after."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected an H x W or H x W x 3/4 array, got shape {a.shape}"
                         " (several images: pass a list)")
    if a.size == 0:
        raise ImageError(f"{name}: empty image")
    if a.dtype.kind == "f":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ImageError(f"{name}: a float array must hold values in [0, 1]")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: array of {a.dtype}: expected uint8, or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def _open(src: ImageSource, name: str) -> Image.Image:
    """Decode with a size check first, so a bomb is refused before it is decompressed (an
    `Image.open` result not yet loaded included)."""
    try:
        if isinstance(src, np.ndarray):
            im = _from_array(src, name)
        elif isinstance(src, Image.Image):
            im = src
        else:
            im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else Path(src))
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w}x{h} image is larger than {MAX_PIXELS} pixels")
        im.load()
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e
    return im


def _to_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode to 8-bit gray; transparency is laid over the colour that keeps contrast."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # float32 plane by plane: a float64 RGBA copy of a large upload cost gigabytes
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3] * np.float32(1 / 255)
        lum = sum(rgba[..., c] * np.float32(k) for c, k in enumerate((0.299, 0.587, 0.114)))
        opaque = alpha > 0.5
        # Light ink on transparency (made for dark themes) would vanish on white.
        under = 0.0 if opaque.any() and lum[opaque].mean() > 128 else 255.0
        gray = lum * alpha + np.float32(under) * (1 - alpha)
        return np.clip(gray.round(), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("L"))


def _background_is_dark(img: np.ndarray) -> bool:
    """Formula images are mostly background; the border ring is the most reliable sample."""
    if min(img.shape) < 3:
        return bool(np.median(img) < 128)
    ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return bool(np.median(ring) < 128)


def _label(src: ImageSource) -> str:
    if isinstance(src, str | Path):
        return str(src)
    return ("<bytes>" if isinstance(src, bytes) else "<array>" if isinstance(src, np.ndarray)
            else "<PIL image>")


def load_image(src: ImageSource, name: str | None = None) -> np.ndarray:
    """Any PNG/JPEG/... a user has (path, bytes, PIL image or array), as dark-on-white uint8
    gray (HxW).

    Handles palette, 16-bit, alpha, EXIF rotation and light-on-dark images (inverted).
    Raises ImageError, naming the file, for anything unreadable or too large.
    """
    label = name or _label(src)
    im = _open(src, label)
    try:
        im = ImageOps.exif_transpose(im)
        gray = _to_gray(im)
    except (OSError, ValueError) as e:
        raise ImageError(f"{label}: cannot convert image ({e})") from e
    if gray.size == 0:
        raise ImageError(f"{label}: empty image")
    return 255 - gray if _background_is_dark(gray) else gray


def read_gray_png(path: str | Path) -> np.ndarray:
    """A dataset image as uint8 gray; the datasets ship RGB or L PNGs of gray content."""
    im = _open(path, str(path))
    try:
        return np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: cannot convert image ({e})") from e


# -------------------------------------------------------------- user images at inference


def otsu_threshold(img: np.ndarray) -> int:
    """Gray level that best separates ink from background (Otsu), for noisy or gray paper."""
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0 / w0 - (m0[-1] - m0) / w1) ** 2 * w0 * w1
    between = np.nan_to_num(between[:-1])
    return int(np.argmax(between)) + 1


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """(top, left, height, width) of each 8-connected component of a boolean mask, by
    run-length union-find: pure numpy/Python so inference needs no scipy, and cheap for
    formula images, whose cost grows with the number of ink runs."""
    parent: list[int] = []
    box: list[list[int]] = []  # top, bottom, left, right (inclusive) per label

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[tuple[int, int, int]] = []  # (start, end exclusive, label) of the row above
    padded = np.zeros(mask.shape[1] + 2, np.int8)
    for y, row in enumerate(mask):
        padded[1:-1] = row
        edges = np.diff(padded)
        runs: list[tuple[int, int, int]] = []
        j = 0
        for s, e in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
            while j < len(prev) and prev[j][1] < s:
                j += 1
            label = -1
            k = j
            while k < len(prev) and prev[k][0] <= e:  # 8-connected: touching diagonally too
                root = find(prev[k][2])
                if label < 0:
                    label = root
                elif root != label:
                    parent[root] = label
                    a, b = box[label], box[root]
                    box[label] = [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]),
                                  max(a[3], b[3])]
                k += 1
            if label < 0:
                label = len(parent)
                parent.append(label)
                box.append([y, y, s, e - 1])
            b = box[label]
            box[label] = [b[0], y, min(b[2], s), max(b[3], e - 1)]
            runs.append((s, e, label))
        prev = runs
    roots = sorted({find(i) for i in range(len(parent))})
    return np.array(
        [[box[r][0], box[r][2], box[r][1] - box[r][0] + 1, box[r][3] - box[r][2] + 1]
         for r in roots], dtype=np.int64).reshape(-1, 4)


def count_runs(mask: np.ndarray) -> int:
    """Number of horizontal ink runs: what `component_boxes` spends its Python loop on."""
    if mask.size == 0:
        return 0
    return int(mask[:, 0].sum()) + int(np.count_nonzero(mask[:, 1:] & ~mask[:, :-1]))


def bounded_component_boxes(mask: np.ndarray) -> np.ndarray:
    """`component_boxes`, refused (ImageError) for masks no formula makes, so that one noisy
    image costs a bounded time: the run count is checked in numpy before the Python loop, the
    component count before the per-component work of the callers."""
    if count_runs(mask) > MAX_INK_RUNS:
        raise ImageError(f"too many ink components (noise?): over {MAX_INK_RUNS} ink runs")
    boxes = component_boxes(mask)
    if len(boxes) > MAX_INK_COMPONENTS:
        raise ImageError(f"too many ink components (noise?): {len(boxes)}, at most "
                         f"{MAX_INK_COMPONENTS}")
    return boxes


def _glyph_boxes(boxes: np.ndarray) -> np.ndarray:
    """Component boxes without specks: anything under a fifth of the typical component
    (JPEG noise, dust; a period or an i's dot is larger than that)."""
    if boxes.size == 0:
        raise ImageError("image has no ink")
    big = boxes[:, 2:].max(axis=1)
    return boxes[big >= 0.2 * np.median(big)]


def _formula_extent(all_boxes: np.ndarray, glyphs: np.ndarray, reach: float
                    ) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the glyphs plus every small component within `reach`
    pixels of them: a trailing period, a comma or a prime is smaller than the speck limit of
    `_glyph_boxes`, and cropping it away changed the formula (IM2LATEX formulas often end with
    one); dust farther out in the margin stays outside."""
    top, left = glyphs[:, 0].min(), glyphs[:, 1].min()
    bottom, right = (glyphs[:, 0] + glyphs[:, 2]).max(), (glyphs[:, 1] + glyphs[:, 3]).max()
    for y, x, h, w in all_boxes:
        near = (y + h >= top - reach and y <= bottom + reach
                and x + w >= left - reach and x <= right + reach)
        if near:
            top, left = min(top, y), min(left, x)
            bottom, right = max(bottom, y + h), max(right, x + w)
    return int(top), int(left), int(bottom), int(right)


def glyph_size(boxes: np.ndarray) -> float:
    """A scale-proportional size of the glyphs, in pixels, from component boxes: the
    geometric mean of the 75th percentile of heights and the median of sqrt(height*width).

    Used for distances (how far a trailing period may sit); the scale itself comes from
    data.glyph_scale, because this statistic moves with the letter mix and sub/superscripts.
    """
    heights, widths = boxes[:, 2].astype(np.float64), boxes[:, 3].astype(np.float64)
    tall = float(np.percentile(heights, 75))
    area = float(np.median(np.sqrt(heights * widths)))
    return float(np.sqrt(tall * area))


def at_least_min_size(img: np.ndarray) -> np.ndarray:
    """Paper added at the bottom and right (where buckets pad too) up to the encoder's minimum."""
    h, w = img.shape
    if h >= MIN_HEIGHT and w >= MIN_WIDTH:
        return img
    return np.pad(img, ((0, max(0, MIN_HEIGHT - h)), (0, max(0, MIN_WIDTH - w))),
                  constant_values=255)


def _fits_largest_bucket(img: np.ndarray) -> bool:
    return bucket_size(img.shape[1], img.shape[0]) is not None


def read_user_image(src: ImageSource, name: str | None = None, normalize: bool = True
                    ) -> np.ndarray:
    """A user's image (path, bytes, PIL image or array) as the model takes it: the one path that
    inference, the Python API, evaluation, the dataset builders and the benchmarks share, so
    that a score measured by one holds for the others. ``normalize=False`` feeds an image already
    in the training look as it is. Raises ImageError, naming the file, for anything that cannot
    be read within bounds."""
    img = load_image(src, name)
    return model_input(normalize_user_image(img) if normalize else img)


def read_user_readings(src: ImageSource, name: str | None = None, normalize: bool = True
                       ) -> Readings:
    """read_user_image's model input, then, where the glyph scale is ambiguous, a second
    reading of the image at the other scale (normalized_readings) for the decoder to judge:
    what inference, evaluation, the web page and the benchmarks decode (im2latex.api.Reader
    keeps the second only when the model reads it much more surely)."""
    img = load_image(src, name)
    return model_readings(normalized_readings(img) if normalize else Readings((img,)))


def model_readings(readings: Readings) -> Readings:
    """Readings of one image (normalized_readings) as the model takes them (model_input),
    judged as they were: the web page's path from an image it has loaded itself."""
    return Readings(map(model_input, readings), readings.even)


def model_input(img: np.ndarray) -> np.ndarray:
    """A normalized image as the model takes it: in its bucket, at least the encoder's minimum.

    Beyond the largest bucket it is refused: the model never saw larger images, and the
    encoder's memory grows with the pixels (normalize_user_image always fits, so only images
    fed as they are can be refused)."""
    if not _fits_largest_bucket(img):
        w, h = BUCKETS[-1]
        raise ImageError(f"{img.shape[1]}x{img.shape[0]} image is larger than the largest "
                         f"bucket {w}x{h}")
    return at_least_min_size(pad_to_bucket(img))


def _to_analysis_size(img: np.ndarray) -> np.ndarray:
    """Shrunk to at most _ANALYSIS_SIDE: bounds the cost of every step after it."""
    longest = max(img.shape)
    if longest <= _ANALYSIS_SIDE:
        return img
    h, w = img.shape
    f = _ANALYSIS_SIDE / longest
    return np.asarray(Image.fromarray(img).resize(
        (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS))


def _resample_scale(shape: tuple[int, int], scale: float, pad_px: int, factor: int) -> float:
    """Factor that brings glyphs to the training scale, capped at MIN_GLYPH_SIZE's and at
    what keeps the finished image (padding included) inside the largest bucket."""
    h, w = shape
    largest_w, largest_h = BUCKETS[-1]
    fit = min((factor * largest_w - 2 * pad_px) / w, (factor * largest_h - 2 * pad_px) / h)
    return min(factor / max(scale, MIN_GLYPH_SIZE / REFERENCE_GLYPH_SIZE), fit)


def analyse(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(analysis-size image, ink mask, all component boxes, glyph boxes): the bounded
    component analysis that the scale estimate and the crop of normalize_user_image share."""
    img = _to_analysis_size(img)
    ink = img < otsu_threshold(img)
    all_boxes = bounded_component_boxes(ink)
    return img, ink, all_boxes, _glyph_boxes(all_boxes)


def estimate_scale(glyphs: np.ndarray) -> float:
    """How many times larger than the training renders the glyphs are (data.glyph_scale)."""
    return glyph_scale.estimate_scale(glyphs)


def _ink_levels(img: np.ndarray, ink: np.ndarray) -> tuple[float, float]:
    """(paper, ink) gray levels under an ink mask: the paper's median (white where there is
    none) and the ink's 5th percentile, its darkest without being one stray pixel."""
    paper = float(np.median(img[~ink])) if (~ink).any() else 255.0
    return paper, float(np.percentile(img[ink], 5))


@dataclass(frozen=True)
class _Reading:
    """One reading of a user image's glyph scale: the analysis-size image, the ink mask that
    was read, its component and glyph boxes, the scale they give, whether the image is
    hard-edged (which sends even a training-scale image through the resample path), and the
    (paper, ink) levels under Otsu's mask."""

    img: np.ndarray
    ink: np.ndarray
    all_boxes: np.ndarray
    boxes: np.ndarray
    scale: float
    hard: bool
    levels: tuple[float, float]
    resampled: bool = False  # resampled even at the training scale (_resampled)


def _read_scale(img: np.ndarray) -> _Reading:
    """Otsu's mask and its scale, of the image sharpened first if it is blurred (_unblurred);
    for an image that mask calls larger than the training scale, the halo-free second opinion
    of _without_halo."""
    img, ink, all_boxes, boxes = analyse(img)
    levels = _ink_levels(img, ink)
    if (sharpened := _unblurred(img, ink, levels)) is not None:
        img, ink, all_boxes, boxes = sharpened
        levels = _ink_levels(img, ink)
    scale = estimate_scale(boxes)
    has_paper = bool((~ink).any())  # else there are no edges to judge
    hard = has_paper and _hard_edged(img, ink, levels)
    if scale > TRAINING_SCALE_RANGE[1] and has_paper and (sharp := _without_halo(img, levels)):
        ink, all_boxes, boxes, scale = sharp  # a blurred image at the training scale
    return _Reading(img, ink, all_boxes, boxes, scale, hard, levels)


def _unblurred(img: np.ndarray, ink: np.ndarray, levels: tuple[float, float]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """analyse()'s result for the image sharpened, where its edges are blurred: a model trained
    on sharp renders reads a sharpened blur better, and Otsu's mask of the sharpened image has
    no halo. None where the edges are not blurred, or the sharpened image's analysis refuses
    it (the image is then read as it is)."""
    if ink.all() or _steepness(img, levels) >= _BLURRED_STEEPNESS:
        return None
    try:
        return analyse(np.asarray(Image.fromarray(img).filter(_SHARPEN)))
    except ImageError:
        return None


def _in_training_range(scale: float) -> bool:
    return TRAINING_SCALE_RANGE[0] <= scale <= TRAINING_SCALE_RANGE[1]


def _passed_through(r: _Reading) -> bool:
    """Is the reading's image only cropped and contrast-stretched, not resampled (_normalized)?
    At the training scale, unless hard-edged or read resampled on purpose (_resampled)."""
    return _in_training_range(r.scale) and not (r.hard or r.resampled)


def _without_halo(img: np.ndarray, levels: tuple[float, float]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(ink mask, component boxes, glyph boxes, scale) of a blurred image at the training scale,
    from the mask at the midpoint between paper and ink; None if that mask does not put the
    image at the training scale.

    Otsu's threshold on a mostly white page sits near the paper, so a blurred image's mask
    carries a halo: every box grows by the blur's width and close glyphs merge, and a blurred
    render at the training scale was estimated up to 1.7x larger, then shrunk and binarized.
    At the midpoint a blurred edge sits where the sharp edge was. It is only a second opinion
    for images Otsu calls larger than the training scale: on thin anti-aliased strokes the
    midpoint breaks glyphs into pieces and calls them smaller (docs/training.md, stage 3)."""
    found = _scale_under(img < sum(levels) / 2)
    return found if found is not None and _in_training_range(found[3]) else None


def _scale_under(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(mask, component boxes, glyph boxes, scale) of another ink mask; None where it has no
    ink or the component analysis refuses it (a second opinion never refuses an image that
    the first accepted)."""
    if not mask.any():
        return None
    try:
        all_boxes = bounded_component_boxes(mask)
        glyphs = _glyph_boxes(all_boxes)
    except ImageError:
        return None
    return mask, all_boxes, glyphs, estimate_scale(glyphs)


# An image whose edges climb this little (_steepness) is blurred, or enlarged, which spreads
# its edges alike: a render's edges measure about 0.8, a render blurred by a 1-px radius under
# 0.45, and every other look at the training scale (noise, anti-aliasing, fonts, JPEG) above
# 0.5 (docs/training.md, stage 6 of v2).
_BLURRED_STEEPNESS = 0.45

# Gentle on purpose: a stronger mask (radius 1.5, 200%) read blurred images no better and
# clean renders worse, and on noisy images any unsharp mask amplifies the noise.
_SHARPEN = ImageFilter.UnsharpMask(radius=1, percent=150, threshold=0)


def _steepness(img: np.ndarray, levels: tuple[float, float]) -> float:
    """How steeply the image's edges climb: the 90th percentile of the steps between
    neighbouring pixels (of those over a tenth of the contrast), as a share of the paper-ink
    contrast. A sharp edge takes most of the contrast in one step; a blurred one spreads it
    over several pixels, a gaussian of 1-px radius to about 0.4 of it."""
    paper, dark = levels
    contrast = max(paper - dark, 1.0)
    a = img.astype(np.int16)  # steps in gray levels; only the edges' are kept, then scaled
    edges = np.concatenate([s[s > 0.1 * contrast] for s in (
        np.abs(np.diff(a, axis=1)), np.abs(np.diff(a, axis=0)))])
    return float(np.quantile(edges, 0.9)) / contrast if edges.size else 1.0


# Where the unbroken mask cuts, as a share of the way from ink to paper: light enough to keep
# the faint anti-aliased pixels that join a thin stroke (docs/training.md, stage 4 of v2).
_UNBROKEN_LEVEL = 0.8


def _unbroken(first: _Reading) -> _Reading | None:
    """The image read at the training scale where Otsu calls it smaller but a mask near the
    paper level calls it training scale; None otherwise.

    A render anti-aliased at the training resolution (a screen's math at 100 dpi) has strokes
    about a pixel wide, partly gray: Otsu's mask breaks its glyphs into pieces, reads them as
    small letters, and the image was enlarged 1.5-4x and read as garbage. A mask near the paper
    joins the pieces. But a genuinely small image (a 0.6x screenshot) has merged gray glyphs
    that the same mask also calls training scale, and nothing in the pixels tells the two
    apart: so this is an alternative for the model to judge (im2latex.api's Reader keeps it
    only when the model reads it much more surely), never a replacement."""
    if first.scale >= TRAINING_SCALE_RANGE[0] or first.ink.all():
        return None
    paper, dark = first.levels
    other = _read_under(first, first.img < dark + _UNBROKEN_LEVEL * (paper - dark))
    return other if other is not None and _in_training_range(other.scale) else None


def _separated(first: _Reading) -> _Reading | None:
    """The image read smaller where Otsu calls it training scale but the midpoint mask (as
    _without_halo's) calls it smaller; None otherwise.

    The mirror of _unbroken. A genuinely small image (a 0.6x screenshot) has gray gaps between
    close glyphs; Otsu's threshold, near the paper, counts them as ink and merges the glyphs
    into larger boxes, so about one in nine such images was estimated at 0.84-0.95x and read
    small. The midpoint mask separates them. It also breaks the thin gray strokes of a render
    anti-aliased at the training scale and calls that small, so this too is an alternative for
    the model to judge, never a replacement (docs/training.md, stage 5 of v2)."""
    if not _in_training_range(first.scale) or first.ink.all():
        return None
    other = _read_under(first, first.img < sum(first.levels) / 2)
    return other if other is not None and other.scale < TRAINING_SCALE_RANGE[0] else None


def _read_under(first: _Reading, mask: np.ndarray) -> _Reading | None:
    """The first reading's image read under another ink mask (its levels and edges kept);
    None where that mask has no ink or the component analysis refuses it."""
    found = _scale_under(mask)
    if found is None:
        return None
    ink, all_boxes, boxes, scale = found
    return replace(first, ink=ink, all_boxes=all_boxes, boxes=boxes, scale=scale)


def _hard_edged(img: np.ndarray, ink: np.ndarray, levels: tuple[float, float]) -> bool:
    """Is the image binary, without the soft edges of every training render (rendered at
    twice the scale and LANCZOS-halved)? A 100-dpi render or a thresholded scan is: fewer
    pixels between ink and paper than 5% of the ink's."""
    paper, dark = levels
    between = (img > dark + 0.15 * (paper - dark)) & (img < dark + 0.85 * (paper - dark))
    return int(between.sum()) < 0.05 * int(ink.sum())


def normalize_user_image(
    img: np.ndarray, bucket: bool = False, pad_px: int = 8, factor: int = 2,
) -> np.ndarray:
    """A user's formula image rescaled and styled like the renderer's output.

    The model only saw 12pt formulas at one size, so the glyph scale is estimated
    (estimate_scale; a blurred image is sharpened first, and where its mask still carries a
    halo, read from a mask without it). An image
    already at the training scale (TRAINING_SCALE_RANGE), unless it is hard-edged, is only
    cropped, contrast-stretched and padded; any other is resampled to ``factor`` x the
    training resolution, where pixels with at least half ink (_coverage: less for a soft image
    enlarged) become black, and finished exactly like a render (crop, pad, optional bucket,
    LANCZOS halving).

    The work is bounded whatever the input (a server and a batch job call this on untrusted
    files): the analysis runs at most at _ANALYSIS_SIDE, the component analysis refuses noise,
    the scale is capped and the result always fits the largest bucket and the encoder's
    minimum size. ImageError for anything that cannot be read within these bounds.
    """
    return _normalized(_read_scale(img), bucket, pad_px, factor)


def normalized_readings(img: np.ndarray, bucket: bool = False) -> Readings:
    """normalize_user_image's result, then, where the glyph scale is ambiguous, the image read
    at the other scale: larger where Otsu calls it small (_unbroken), smaller where Otsu calls
    it training scale (_separated), resampled where it sits at the window's low edge
    (_resampled, judged evenly). One or two images for the model to judge."""
    first = _read_scale(img)
    second = _unbroken(first) or _separated(first) or _resampled(first)
    readings = [first] if second is None else [first, second]
    return Readings((_normalized(r, bucket) for r in readings),
                    even=second is not None and second.resampled)


# Below this estimated scale an image inside the pass-through window also gets a resampled
# reading. A 0.8x screenshot is estimated at 0.84-0.86, inside the window, and was read a fifth
# small: 0.8x read worse than 0.7x. Resampled it reads 3-4 BLEU better, but renders anti-aliased
# at the training scale (also estimated there, Utopia, 100 dpi) read worse, and the pixels do
# not tell the two apart; narrowing the window cost those rows (docs/training.md, stage 16 of
# v2). The model judges, evenly (stage 17).
_RESAMPLED_BELOW = 0.9


def _resampled(first: _Reading) -> _Reading | None:
    """The first reading enlarged to the training scale where it would be passed through at
    the low edge of the window (below _RESAMPLED_BELOW), soft-edged; None otherwise."""
    low_edge = _passed_through(first) and first.scale < _RESAMPLED_BELOW
    return replace(first, resampled=True) if low_edge else None


# The ink share at which a pixel of the resampled image becomes black. In a soft image that
# is enlarged (a small anti-aliased screenshot) thin strokes never reach full ink, and a cut
# at half broke them into pieces; a cut nearer the paper keeps them whole at the price of
# bolder strokes, which the model reads far better, having trained on bold ones
# (docs/training.md, stage 6 of v2). Images reduced keep the cut at half, and hard-edged ones
# need none: their pixels are ink or paper.
_COVERAGE = 0.5
_SOFT_ENLARGED_COVERAGE = 0.42


def _coverage(r: _Reading) -> float:
    """The cut of the reading's resampled image: nearer the paper for a soft one enlarged."""
    enlarged = r.scale < TRAINING_SCALE_RANGE[0] or r.resampled
    return _SOFT_ENLARGED_COVERAGE if enlarged and not r.hard else _COVERAGE


def _normalized(r: _Reading, bucket: bool = False, pad_px: int = 8, factor: int = 2
                ) -> np.ndarray:
    """The image of one reading, finished as normalize_user_image describes."""
    size_px = glyph_size(r.boxes)
    top, left, bottom, right = _formula_extent(r.all_boxes, r.boxes, reach=1.5 * size_px)
    crop, ink = r.img[top:bottom, left:right], r.ink[top:bottom, left:right]
    paper, dark = _ink_levels(crop, ink)
    if _passed_through(r):
        # Already at the training scale: only stretch paper to white and ink to black. The
        # resample-and-threshold round trip below moves edges by a pixel, and on renders that
        # cost the reference model 12 BLEU points. A hard-edged image takes the round trip
        # all the same: its halving gives it the soft edges the model knows (the 100-dpi
        # robustness row: docs/training.md, stage 3 of v2).
        edge = 4  # the Otsu mask leaves out the lightest anti-aliased edge pixels
        region = r.img[max(0, top - edge):bottom + edge, max(0, left - edge):right + edge]
        span = max(paper - dark, 1.0)
        flat = np.clip((region.astype(np.float64) - dark) * (255.0 / span), 0, 255)
        # crop at 250, not 255: a render's LANCZOS halving leaves faint ringing (251-254) in
        # its margin, and counting it as ink shifted the formula by up to 3 px
        out = pad(crop_to_ink(np.round(flat).astype(np.uint8), threshold=250), pad_px // factor)
        if _fits_largest_bucket(out):  # else shrunk to fit below, like any other image
            return at_least_min_size(pad_to_bucket(out) if bucket else out)
    resample = _resample_scale(crop.shape, r.scale, pad_px, factor)
    h, w = crop.shape
    size = (max(1, round(w * resample)), max(1, round(h * resample)))
    big = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS))
    binary = np.where(big < paper - _coverage(r) * (paper - dark), 0, 255).astype(np.uint8)
    if not (binary < 255).any():
        raise ImageError("image has no ink after rescaling")
    return at_least_min_size(finish_render(binary, pad_px=pad_px, factor=factor, bucket=bucket))
