"""What a render is asked (RenderOptions) and what it answers (RenderResult, RenderError).

A module of its own because every stage of data.render reads the options (the TeX run its
time limits, Ghostscript its dpi and memory cap, the batches their size and strictness) and the
stages import one another only downwards from here.

Styles: ``RenderOptions(style=NAME)`` (``data.styles.STYLES``) swaps the preamble's font
packages and size, text or display style, the rasterization dpi and binarized or anti-aliased
output; one TeX document holds one style. The default, ``cm``, is IM2LATEX-100K's look.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np

from data.styles import DEFAULT_STYLE, Style, get_style


class RenderError(RuntimeError):
    """The TeX installation itself is unusable (missing program, broken preamble)."""


@dataclass(frozen=True)
class RenderOptions:
    """How to render; the defaults reproduce IM2LATEX-100K's images."""

    dpi: int = 200
    pad: int = 8  # pixels around the ink, at render resolution
    downsample: int = 2
    bucket: bool = False  # paste into the smallest data.image.BUCKETS size
    batch_size: int = 200  # formulas per TeX run (fewer when that would idle a worker)
    timeout_s: float = 120.0  # one TeX or Ghostscript run
    formula_timeout_s: float = 3.0  # TeX busy with one formula
    memory_mb: int = 1024  # address space of each TeX / Ghostscript process
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    strict: bool = False  # True: any TeX error fails the formula
    max_chars: int = 4096
    sandbox: bool = True  # run TeX and Ghostscript under bubblewrap where it can start
    style: str | Style = DEFAULT_STYLE  # a name in data.styles.STYLES (fonts, size, look)

    def __post_init__(self) -> None:
        get_style(self.style)  # an unknown name fails here, listing the valid ones


def effective_options(opts: RenderOptions) -> RenderOptions:
    """The options a style's resolution implies: rasterized at its dpi, shrunk by the
    integer factor that lands at the usual output scale, margins scaled alike."""
    style = get_style(opts.style)
    if style.dpi is None or style.dpi == opts.dpi:
        return opts
    factor, rest = divmod(opts.downsample * style.dpi, opts.dpi)
    if rest or factor < 1:
        raise ValueError(f"style {style.name!r}: {style.dpi} dpi is no integer multiple of "
                         f"the output scale ({opts.dpi} dpi / {opts.downsample})")
    return replace(opts, dpi=style.dpi, downsample=factor,
                   pad=round(opts.pad * style.dpi / opts.dpi))


@dataclass(frozen=True)
class RenderResult:
    """An image, or the reason there is none."""

    image: np.ndarray | None
    error: str | None = None
