"""Augmentation of training images on the fly: the looks people's images have and ours lack.

A stored training image is a clean render at one glyph size. People bring screenshots at other
sizes, scans, JPEGs, gray paper. Each transform here imitates one of those departures on the
raw uint8 image (dark on white); the result then goes through ``normalize_user_image``, the
normalization inference applies, so the model trains on what inference will hand it, and is
finally fitted into the item's bucket so that it still stacks with its batch.

Randomness comes from a generator seeded by (seed, epoch, index) alone: an image looks the
same whichever loader worker draws it and whenever a resumed run reaches it, which keeps
resume exact. Written with numpy and PIL, the libraries ``data/image.py`` already uses, so the
augmented image is resampled and smoothed by the same code as the renders and user images;
the degradations themselves are ``data.degrade``'s, which the robustness benchmark applies at
fixed strengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from data import degrade
from data.image import ImageError, crop_to_ink, ink_bbox, normalize_user_image, pad

# Named levels of --augment; a number in [0, 1] is accepted too.
LEVELS = {"none": 0.0, "light": 0.5, "strong": 1.0}

# At strength s an image is augmented with probability AUGMENTED_SHARE * s: a share of clean
# renders keeps the benchmark look (what the clean test rows read) in every epoch.
AUGMENTED_SHARE = 0.8

# Stored renders carry faint LANCZOS ringing (251-254) in their margin: not ink.
_INK = 250

# A normalized image larger than its item's bucket is shrunk into it; beyond this shrink the
# glyphs would be smaller than anything inference produces, and the clean image is used.
MIN_FIT_SCALE = 0.75

# Bounds of a legible result against the clean image (docs/results/augment.txt): the
# normalization overestimates the glyph size of bold, blurred strokes that merge, and shrinks
# such a formula into a blot. Size is the ratio of the ink extents (geometric mean of width
# and height), boldness the ratio of ink density (ink pixels per extent) divided by the size:
# the same strokes on smaller glyphs close the counters sooner. Beyond these bounds the
# samples looked at were unreadable, and a label nobody could read off the image only teaches
# noise, so the clean image is used instead.
MIN_SIZE_RATIO = 0.7
MAX_BOLDNESS = 2.0

Transform = Callable[[np.ndarray, np.random.Generator, float], np.ndarray]


def parse_level(text: str) -> float:
    """``none|light|strong`` or a strength in [0, 1]; ValueError (argparse's message) else."""
    if text in LEVELS:
        return LEVELS[text]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected none, light, strong or a number in [0, 1], not {text!r}")
    return value


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img, mode="L") if img.dtype == np.uint8 else Image.fromarray(img)


def scale(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Glyph size of another screen or zoom level: 0.7x-1.6x at full strength, log-uniform so
    shrinking and enlarging are drawn alike."""
    return degrade.rescale(img, math.exp(rng.uniform(math.log(1 - 0.3 * s),
                                                      math.log(1 + 0.6 * s))))


# A rasterizer's anti-aliasing averages (BOX), a browser resizes bilinearly, an editor with
# LANCZOS: a small image's strokes soften and merge differently under each.
_SHRINK_FILTERS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)


def low_res(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A formula rasterized or screenshotted small, 0.6x-0.85x at full strength (on top of
    ``scale``'s size, so down to about half the training scale). Normalization brings it back
    up as it does a user's small image, and the model learns the soft, merged strokes that
    leaves: the low-resolution and 100-dpi robustness rows lagged clean renders by 12-19 BLEU
    while ``scale`` alone reaches only 0.7x. Off unless Augmenter's ``low_res`` asks for it."""
    factor = math.exp(rng.uniform(math.log(min(0.85, 1 - 0.4 * s)), math.log(0.85)))
    return degrade.rescale(img, factor, _SHRINK_FILTERS[int(rng.integers(len(_SHRINK_FILTERS)))])


# Where a binary rasterizer's cut falls, as a share of the way from ink (0) to paper (255).
_BINARY_CUTS = (0.5, 0.8)


def binary(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Every pixel ink or paper, as a rasterizer without anti-aliasing draws a formula (a
    100-dpi PDF viewer, a GIF) and a thresholded scan or fax stores it. Ghostscript paints a
    pixel that a glyph only partly covers, so its strokes are bolder than a cut at half
    coverage: the cut is drawn from the middle to near the paper, where the ink of 100-dpi
    renders matched (docs/training.md, stage 6 of v2). Normalization sends such hard-edged
    images through its resample path, which the model then learns to read; the held-out
    100-dpi style is the benchmark's image of them. Off unless Augmenter's ``binary`` asks."""
    cut = 255 * rng.uniform(*_BINARY_CUTS)
    return np.where(img < cut, 0, 255).astype(np.uint8)


def stroke(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Bold or thin strokes (other font weights, ink spread in scans). A full 3x3 erosion or
    dilation moves every edge by a whole pixel, which erases 1-px strokes or fills counters at
    the training scale, so the filtered image is blended in: a sub-pixel weight change."""
    bold = bool(rng.random() < 0.5)
    filt = ImageFilter.MinFilter(3) if bold else ImageFilter.MaxFilter(3)
    moved = np.asarray(_pil(img).filter(filt), dtype=np.float32)
    alpha = rng.uniform(0.3, 0.3 + 0.6 * s)
    return np.round(img + alpha * (moved - img)).astype(np.uint8)


def rotate_shear(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """A slightly skewed scan or photo: rotation up to 3 degrees and shear up to 0.1, about the
    centre of a canvas grown so that nothing leaves it."""
    angle = math.radians(rng.uniform(-3, 3) * s)
    shear = rng.uniform(-0.1, 0.1) * s
    h, w = img.shape
    grow = math.ceil(abs(math.tan(angle)) * max(h, w) + abs(shear) * h) // 2 + 2
    canvas = pad(img, grow)
    c, si = math.cos(angle), math.sin(angle)
    forward = np.array([[c, -si], [si, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    centre = np.array([canvas.shape[1], canvas.shape[0]]) / 2
    off = centre - inv @ centre
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    out = _pil(canvas).transform((canvas.shape[1], canvas.shape[0]), Image.Transform.AFFINE,
                                 data, resample=Image.Resampling.BICUBIC, fillcolor=255)
    return np.asarray(out)


def margins(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Uneven paper around the formula, as a hand-drawn screenshot selection leaves it."""
    h = max(8, min(img.shape))
    return degrade.uneven_margins(img, rng, 0, max(2, round(1.5 * h * s)) - 1)


def blur(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Soft edges of an out-of-focus scan or a resampled screenshot."""
    return degrade.blur(img, rng.uniform(0.3, 0.3 + 0.9 * s))


def contrast(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Gray paper and gray ink: a scan, a tinted web page, a faint print."""
    paper = rng.uniform(255 - 90 * s, 255)
    return degrade.recolor(img, ink=rng.uniform(0, 110 * s), paper=paper)


def noise(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Sensor or scanner noise, gaussian per pixel."""
    return degrade.gaussian_noise(img, rng, sigma=rng.uniform(2, 2 + 10 * s))


def jpeg(img: np.ndarray, rng: np.random.Generator, s: float) -> np.ndarray:
    """Block artefacts and ringing of an image saved or shared as JPEG."""
    return degrade.jpeg(img, quality=int(rng.integers(round(95 - 70 * s), 96)))


# (name, probability when an image is augmented, transform), in the order a real image picks
# them up: typeset at some size and weight, skewed, cut out, blurred, on its paper, noisy, saved.
TRANSFORMS: tuple[tuple[str, float, Transform], ...] = (
    ("scale", 0.8, scale),
    ("stroke", 0.4, stroke),
    ("rotate_shear", 0.4, rotate_shear),
    ("margins", 0.5, margins),
    ("blur", 0.4, blur),
    ("contrast", 0.4, contrast),
    ("noise", 0.3, noise),
    ("jpeg", 0.4, jpeg),
)


def with_shares(low_res_share: float = 0.0, binary_share: float = 0.0
                ) -> tuple[tuple[str, float, Transform], ...]:
    """TRANSFORMS with ``low_res`` and ``binary`` drawn at their shares right after ``scale``
    (a size, then its rasterization: at a low resolution, without anti-aliasing); a transform
    at share 0 is left out, so that runs from before it draw exactly what they did."""
    extra = tuple((name, share, fn) for name, share, fn in (
        ("low_res", low_res_share, low_res), ("binary", binary_share, binary)) if share)
    return TRANSFORMS if not extra else (TRANSFORMS[0], *extra, *TRANSFORMS[1:])


def distort(img: np.ndarray, rng: np.random.Generator, s: float,
            transforms: tuple[tuple[str, float, Transform], ...] = TRANSFORMS) -> np.ndarray:
    """The transforms drawn for one image, applied to the formula cropped from its bucket."""
    out = crop_to_ink(img, threshold=_INK)
    for _, p, fn in transforms:
        if rng.random() < p:
            out = fn(out, rng, s)
    return out


def fit_into(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """At the top-left of a white canvas of ``shape`` (where buckets put images), shrunk to fit
    if needed; None if that takes more than MIN_FIT_SCALE. The batch is stacked in its bucket's
    shape, so the item's bucket is the one the image must fit; a smaller image only gets more
    paper on the right and bottom, as every image in a bucket larger than it needs has."""
    h, w = img.shape
    f = min(1.0, shape[0] / h, shape[1] / w)
    if f < MIN_FIT_SCALE:
        return None
    if f < 1.0:
        size = (max(1, min(shape[1], math.floor(w * f))), max(1, min(shape[0], math.floor(h * f))))
        img = np.asarray(_pil(img).resize(size, Image.Resampling.LANCZOS))
        h, w = img.shape
    return np.pad(img, ((0, shape[0] - h), (0, shape[1] - w)), constant_values=255)


def legible(clean: np.ndarray, out: np.ndarray) -> bool:
    """Whether ``out`` keeps the formula of ``clean`` readable: not shrunk below
    MIN_SIZE_RATIO of its extent, strokes not thickened beyond MAX_BOLDNESS."""
    a, b = ink_bbox(clean, threshold=_INK), ink_bbox(out, threshold=_INK)
    if a is None or b is None:
        return False
    area = (b[1] - b[0]) * (b[3] - b[2]) / ((a[1] - a[0]) * (a[3] - a[2]))
    size = math.sqrt(area)
    ink = np.count_nonzero(out < 128) / max(1, np.count_nonzero(clean < 128))
    return size >= MIN_SIZE_RATIO and ink / area / size <= MAX_BOLDNESS


class Augmenter:
    """The per-item hook of FormulaDataset: a pure function of (image, epoch, index)."""

    def __init__(self, strength: float, seed: int, low_res: float = 0.0, binary: float = 0.0):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"augmentation strength must be in (0, 1], not {strength}")
        for what, share in (("low-resolution", low_res), ("binary", binary)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{what} share must be in [0, 1], not {share}")
        self.strength, self.seed = strength, seed
        self.transforms = with_shares(low_res, binary)
        self.fallbacks = 0  # images left clean: refused by normalization, fitting or legible

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**63, epoch, index])

    def __call__(self, img: np.ndarray, epoch: int, index: int) -> np.ndarray:
        rng = self.rng(epoch, index)
        if rng.random() >= AUGMENTED_SHARE * self.strength:
            return img
        try:
            out = fit_into(normalize_user_image(distort(img, rng, self.strength,
                                                           self.transforms)), img.shape)
        except ImageError:
            out = None
        if out is None or not legible(img, out):
            self.fallbacks += 1
            return img
        return out
