"""The pdflatex document of a batch: one page per formula, markers between them, and the part
of the A4 page that is rasterized.

Each formula goes on its own page exactly as the original pipeline typeset it alone
(``article`` 12pt, ``\\pagestyle{empty}``, amsmath, ``displaymath``, A4 PDF media). Fidelity
depends on the glyphs' sub-pixel phase, so the page layout is kept and only a window of the
page is rasterized (pdfTeX's origin shifted by whole pixels), which is pixel-identical to the
full page and ~5x cheaper. Before each formula TeX prints a marker with its page count, group
depth and conditional depth (data.tex_process reads them live); every formula starts with the
counters of a fresh document.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from data.styles import Style
from data.tex_screen import tex_body, wrap_multiline

# The dataset's glyphs sit this far (in bp) below where this TeX Live puts them on A4: found
# by scanning sub-pixel offsets against the sample; it halves the pixel error on
# well-matched images.
_VERTICAL_PHASE_BP = 0.06
_HORIZONTAL_PHASE_BP = 0.0

# The rasterized window, in pixels at 200 dpi: columns 330..1430, rows 360..760 of the A4
# page. On 1000 test formulas the ink spanned columns 355..1339 and rows 382..668.
WINDOW = (330, 360, 1100, 400)  # left, top, width, height


@dataclass(frozen=True)
class Geometry:
    """Which part of the A4 page to rasterize, in pixels; no size means the whole page."""

    left: int = 0
    top: int = 0
    width: int | None = None
    height: int | None = None



def make_document(
    formulas: Sequence[str], nonce: str, geometry: Geometry, dpi: int, style: Style
) -> str:
    """One page per formula; markers tell which formula TeX is on and how many pages exist."""
    px = 72.0 / dpi  # one pixel in bp
    setup = [
        f"\\pdfhorigin=\\dimexpr1truein+{_HORIZONTAL_PHASE_BP}bp-{geometry.left * px:.5f}bp\\relax",
        f"\\pdfvorigin=\\dimexpr1truein+{_VERTICAL_PHASE_BP}bp-{geometry.top * px:.5f}bp\\relax",
        f"\\pdfpagewidth=\\dimexpr210truemm-{geometry.left * px:.5f}bp\\relax",
        "\\pdfpageheight=297truemm",
    ]
    if geometry.width is not None:
        setup[2] = f"\\pdfpagewidth={geometry.width * px:.5f}bp"
    if geometry.height is not None:
        # Rows are counted from the top, but Ghostscript sizes the page from its (fractional)
        # height: cut whole rows off the A4 height so every glyph keeps its sub-pixel phase.
        cut = round(297 / 25.4 * dpi) - geometry.height
        setup[3] = f"\\pdfpageheight=\\dimexpr297truemm-{cut * px:.5f}bp\\relax"
    parts = [style.preamble(), "\n".join(setup), _PAGE_STATE, "\\begin{document}\n"]
    # Text style stays in a display (centred, never broken across lines), only smaller.
    lead = "" if style.display else "\\textstyle "
    for i, f in enumerate(formulas):
        parts.append(
            _marker(nonce, str(i))
            + f"\\csname imx@reset\\endcsname\n{style.setup}\\begin{{displaymath}}\n"
            + f"{lead}{wrap_multiline(tex_body(f))}\n\\end{{displaymath}}\n\\newpage\n"
        )
    parts.append(_marker(nonce, "end") + "\\end{document}\n")
    return "".join(parts)


# Every formula starts with the counters of a fresh document (``\\thepage``, ``\\footnotemark``
# must not depend on batch-mates); pages are counted in a register of the document's own,
# which no formula can name (``@`` is no letter in a formula), for the markers.
_PAGE_STATE = r"""
\makeatletter
\newcount\imx@pages
\AddToHook{shipout/after}{\global\advance\imx@pages\@ne}
\def\imx@reset{\begingroup\def\@elt##1{\global\csname c@##1\endcsname\z@}\cl@@ckpt
  \endgroup\global\c@page\@ne}
\makeatother
"""


def _marker(nonce: str, label: str) -> str:
    """TeX prints where it is and its state: pages shipped, group and conditional depth."""
    state = "\\the\\csname imx@pages\\endcsname:\\the\\currentgrouplevel:\\the\\currentiflevel"
    return f"\\message{{@@{nonce}:{label}:{state}@@}}\n"


def marker_pattern(nonce: str) -> re.Pattern[str]:
    """What `_marker` prints, as TeX's terminal shows it: formula (or ``end``), pages shipped,
    group and conditional depth."""
    return re.compile(rf"@@{nonce}:(\d+|end):(\d+):(\d+):(\d+)@@")
