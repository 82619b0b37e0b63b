"""Image degradations: what screens, scanners and image files do to a formula image.

Plain functions of fixed strength on the in-memory convention of docs/design.md (uint8 HxW,
dark ink on white). The robustness benchmark's conditions (``data.conditions``) apply them at
fixed strengths, so that a row means one thing across runs; the training augmentation
(``data.augment``) draws the strengths at random and calls the same functions, so that the
model trains on exactly the operations it is measured on. Every random choice comes from the
``rng`` passed in.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

Rng = np.random.Generator


def encode(img: np.ndarray, fmt: str = "PNG", quality: int = 75) -> bytes:
    """The image as a file's bytes; ``quality`` only matters for JPEG."""
    buf = io.BytesIO()
    extra = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(img).save(buf, format=fmt, **extra)
    return buf.getvalue()


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Saved as a JPEG and read back: block artefacts and ringing around the strokes."""
    return np.asarray(Image.open(io.BytesIO(encode(img, "JPEG", quality))).convert("L"))


def rescale(img: np.ndarray, factor: float,
            resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """Resized by ``factor``, with LANCZOS by default (what browsers and screenshot tools
    approximate)."""
    h, w = img.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(img).resize(size, resample))


def uneven_margins(img: np.ndarray, rng: Rng, low: int = 4, high: int = 60) -> np.ndarray:
    """White paper of a different random width (``low..high`` px) on each side: a hand-made
    crop is never even."""
    top, bottom, left, right = (int(v) for v in rng.integers(low, high + 1, size=4))
    return np.pad(img, ((top, bottom), (left, right)), constant_values=255)


def recolor(img: np.ndarray, ink: int, paper: int) -> np.ndarray:
    """Black maps to ``ink`` and white to ``paper``, linearly: gray backgrounds, faded ink, or
    (ink > paper) light ink on a dark background, keeping the anti-aliased edges."""
    out = paper + (ink - paper) * (1.0 - img.astype(np.float64) / 255.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, rng: Rng, sigma: float) -> np.ndarray:
    """Independent gaussian noise on every pixel (sensor noise of a photo or a scan)."""
    noisy = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur (out of focus, or a resampled screenshot); the margin keeps the spread
    ink inside the image."""
    margin = int(np.ceil(3 * radius))
    padded = np.pad(img, margin, constant_values=255)
    return np.asarray(Image.fromarray(padded).filter(ImageFilter.GaussianBlur(radius)))
