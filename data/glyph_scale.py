"""How much larger than the training scale a formula image is, from its component boxes.

A single statistic of the boxes (a percentile of heights) depends on the letter mix: a formula
of x-height letters and one of capitals and digits differ by half. Instead the scale is a
maximum-likelihood fit: the (log height, log width) of every glyph box is scored against a
density of such boxes in training-scale renders, and the shift of all boxes along the scale
diagonal that fits best is the scale. Every box votes, and a formula with only small letters
still fits at the right shift because its boxes match the small-letter part of the density.

The density (``glyph_scale_template.npy`` beside this file) is built from validation formulas
by ``bench/scale_estimate.py --calibrate``; docs/results/scale_estimate.txt has its error.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

TEMPLATE_PATH = Path(__file__).with_name("glyph_scale_template.npy")

# The density's grid over log(pixels) of box height and width at the training scale: boxes
# from 0.4 px (a shrunken dot) to 245 px (a tall matrix bracket).
LOG_LO, LOG_HI, BINS = -1.0, 5.5, 66
_BIN = (LOG_HI - LOG_LO) / BINS

# Scales tried, in steps of 1% (log): from a quarter of the training scale to twelve times it.
_SHIFTS = np.arange(np.log(0.25), np.log(12.0), 0.01)

# Probability floor of the density: a box no training formula has (a logo, a table rule) then
# costs a fixed penalty instead of dominating the fit.
_FLOOR = 1e-3


def _bin_index(logs: np.ndarray) -> np.ndarray:
    return np.clip(((logs - LOG_LO) / _BIN).astype(np.int64), 0, BINS - 1)


def box_histogram(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Normalized 2-D histogram of a formula's (height, width) boxes, brought to scale 1."""
    hist = np.zeros((BINS, BINS))
    if len(boxes) == 0:
        return hist
    shift = np.log(scale)
    ih = _bin_index(np.log(boxes[:, 2].astype(np.float64)) - shift)
    iw = _bin_index(np.log(boxes[:, 3].astype(np.float64)) - shift)
    np.add.at(hist, (ih, iw), 1.0)
    return hist / len(boxes)


def build_template(box_sets: Iterable[tuple[np.ndarray, float]], smooth: float = 0.7
                   ) -> np.ndarray:
    """Log-density from (glyph boxes, known scale) pairs; each formula weighs the same, and a
    Gaussian blur of ``smooth`` bins turns integer pixel sizes into a continuous density."""
    total = np.zeros((BINS, BINS))
    for boxes, scale in box_sets:
        total += box_histogram(boxes, scale)
    if total.sum() == 0:
        raise ValueError("no boxes to build a template from")
    taps = np.arange(-4, 5)
    kernel = np.exp(-0.5 * (taps / smooth) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        total = np.apply_along_axis(np.convolve, axis, total, kernel, mode="same")
    total /= total.sum()
    return np.log(total + _FLOOR).astype(np.float32)


@lru_cache(maxsize=1)
def load_template(path: Path = TEMPLATE_PATH) -> np.ndarray:
    table = np.load(path)
    if table.shape != (BINS, BINS):
        raise ValueError(f"{path}: template of shape {table.shape}, expected {(BINS, BINS)}")
    return table


def estimate_scale(boxes: np.ndarray, template: np.ndarray | None = None) -> float:
    """Scale of the glyphs relative to the training renders (2.0: twice as large).

    ``boxes`` are glyph boxes (top, left, height, width) without specks; the cost is one table
    lookup per box and tried scale, bounded by the caller's cap on the number of components."""
    if len(boxes) == 0:
        raise ValueError("no boxes to estimate a scale from")
    table = load_template() if template is None else template
    lh = np.log(boxes[:, 2].astype(np.float64))[:, None] - _SHIFTS[None, :]
    lw = np.log(boxes[:, 3].astype(np.float64))[:, None] - _SHIFTS[None, :]
    score = table[_bin_index(lh), _bin_index(lw)].sum(axis=0)
    return float(np.exp(_SHIFTS[int(np.argmax(score))]))
