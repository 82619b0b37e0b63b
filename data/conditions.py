"""Image conditions of the robustness benchmark: what a user's formula image looks like when it
is not one of our renders (a screenshot, a low-resolution crop, a noisy scan, dark mode, ...).

Each condition turns a clean render (uint8 HxW, dark ink on white, docs/design.md) into the
bytes of an image *file*, because the benchmark feeds them to ``data.image.load_image`` exactly
as ``inference.py`` and ``serve.py`` get a user's upload: the file format (JPEG artefacts) and
the decoding (dark-background detection) are part of what is measured.

The image operations live in ``data.degrade``, shared with the training augmentation; every
random choice comes from the ``rng`` passed in, so a condition is deterministic for a given
seed. The strengths are fixed (not sampled) so that a row means one thing across runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data.degrade import Rng, blur, encode, gaussian_noise, recolor, rescale, uneven_margins

# ------------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    """A named way to turn a clean render into an image file a user might have."""

    name: str
    description: str
    make: Callable[[np.ndarray, Rng], bytes]


def _clean(img: np.ndarray, rng: Rng) -> bytes:
    return encode(img)


def _screenshot(img: np.ndarray, rng: Rng) -> bytes:
    # The worst measured case: enlarged as a browser at 160% zoom would, cropped by
    # hand, on a light gray page, and saved as a JPEG (how chat tools pass screenshots on).
    page = uneven_margins(rescale(img, 1.6), rng)
    return encode(recolor(page, ink=20, paper=225), "JPEG", quality=75)


def _scaled(factor: float) -> Callable[[np.ndarray, Rng], bytes]:
    # Resampled and left at that size, as a screenshot at another zoom is: normalization has to
    # bring it to the training scale. Below 1 it is a low-resolution image.
    return lambda img, rng: encode(rescale(img, factor))


def _noise(img: np.ndarray, rng: Rng) -> bytes:
    return encode(gaussian_noise(uneven_margins(img, rng), rng, sigma=15.0))


def _inverted(img: np.ndarray, rng: Rng) -> bytes:
    # Dark mode: light gray ink on a dark gray page, not a pure negative.
    return encode(recolor(img, ink=230, paper=30))


def _blur(img: np.ndarray, rng: Rng) -> bytes:
    return encode(blur(img, radius=1.0))


CONDITIONS: dict[str, Condition] = {c.name: c for c in (
    Condition("clean", "our render (Computer Modern, the training look)", _clean),
    Condition("screenshot", "x1.6 LANCZOS, uneven margins, gray page, JPEG q75", _screenshot),
    Condition("low_res", "x0.6 LANCZOS (left small)", _scaled(0.6)),
    Condition("noise", "uneven margins, gaussian noise sigma 15", _noise),
    Condition("inverted", "light ink (230) on a dark page (30)", _inverted),
    Condition("blur", "gaussian blur radius 1 px", _blur),
)}


# ------------------------------------------------------------------- rows at any scale

SCALE_PREFIX = "scale:"
SCALE_RANGE = (0.2, 4.0)


def scaled(factor: float) -> Condition:
    """The clean render resampled by ``factor`` (LANCZOS) and left at that size: low_res (0.6)
    at any factor. Not in the default table (a row means one thing across runs); asked for by
    name, ``scale:0.7``, a few of them draw reading against glyph size, which says at what size
    a model stops reading where the one low_res row only says how far it falls at 0.6."""
    low, high = SCALE_RANGE
    if not low <= factor <= high:
        raise ValueError(f"a scale row's factor must be in [{low:g}, {high:g}], got {factor:g}")
    return Condition(f"{SCALE_PREFIX}{factor:g}", f"x{factor:g} LANCZOS (left at that size)",
                     _scaled(factor))


def condition(name: str) -> Condition | None:
    """The condition called `name`: one of CONDITIONS or a ``scale:F`` row; None for neither.
    Raises ValueError for a scale row whose factor is not a number in SCALE_RANGE."""
    if name in CONDITIONS:
        return CONDITIONS[name]
    if not name.startswith(SCALE_PREFIX):
        return None
    try:
        factor = float(name[len(SCALE_PREFIX):])
    except ValueError:
        raise ValueError(f"{name!r}: a scale row is scale:F with F a number, e.g. scale:0.7"
                         ) from None
    return scaled(factor)
