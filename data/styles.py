"""Named render styles: the fonts, sizes and rasterizations a formula can be drawn in.

Why: a model trained on one renderer reads only that renderer (issue 12: Times formulas and
anti-aliased screenshots scored less than half of our own renders). Each style changes one or
two things people's images differ in, using only what the Debian TeX packages of
``.ci/install`` typeset (psnfss, txfonts, pxfonts, euler, sansmath; no font is generated).
``cm`` is the IM2LATEX-100K look and the default; it must stay pixel-identical to the
renderer's historic output, so its preamble is the renderer's own and it changes nothing.

Every style's output is at the training scale (a 12pt formula has the glyph size the model
saw), except the 10pt/11pt styles, whose glyphs are smaller on purpose: that is the variety
they add. A resolution style rasterizes at another dpi and is brought to the same scale by
an integer LANCZOS shrink, so only the pixel-level look (stroke weight, jaggies) changes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_STYLE = "cm"


@dataclass(frozen=True)
class Style:
    """How one style differs from the standard look; the defaults are the standard look."""

    name: str
    packages: tuple[str, ...] = ()  # preamble lines after amsmath (\\usepackage{...}, ...)
    size: str = "12pt"  # the article class option: the body and math font size
    display: bool = True  # False: \\textstyle (inline sums, small fractions)
    dpi: int | None = None  # rasterization resolution; None: RenderOptions.dpi
    binary: bool = True  # False: keep Ghostscript's anti-aliasing, as screens show math
    setup: str = ""  # TeX before every formula's display (a math version switch)
    # Raised when a style's look is corrected: built datasets name their images with it
    # (data/build.py image_name), so a rebuild renders the corrected look instead of reusing
    # the old files that resuming would otherwise keep.
    revision: int = 0

    def preamble(self) -> str:
        lines = [f"\\documentclass[{self.size}]{{article}}", "\\pagestyle{empty}",
                 "\\usepackage[cmex10]{amsmath}", *self.packages]
        return "\n".join(lines) + "\n"


_SANS = ("\\usepackage{sansmath}", "\\renewcommand{\\familydefault}{\\sfdefault}")


# The upright capitals of OT1 slots 0-10, in slot order (the math fonts' \\Gamma ... \\Omega).
GREEK_CAPITALS = ("Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Upsilon", "Phi",
                  "Psi", "Omega")


def _greek_capitals(family: str) -> tuple[str, ...]:
    """Preamble lines that take the upright Greek capitals from a Computer Modern family.

    Why: math takes \\Gamma ... \\Omega from slots 0-10 of the operators font, which sansmath
    points at \\sfdefault; the psnfss text fonts (Helvetica, Avant Garde, Bookman, ...) have no
    Greek there, and their virtual fonts draw each missing glyph as a filled box: every capital
    came out as the same black square under eleven different labels. The capitals are fixed
    symbols (\\mathord) so that \\mathbf or \\mathrm around one cannot reach a box again.
    """
    return (f"\\DeclareSymbolFont{{greekcapitals}}{{OT1}}{{{family}}}{{m}}{{n}}",
            *(f"\\DeclareMathSymbol{{\\{name}}}{{\\mathord}}{{greekcapitals}}{{{k}}}"
              for k, name in enumerate(GREEK_CAPITALS)))


def _text_font_math(package: str, family: str) -> tuple[str, ...]:
    """Preamble lines that set math letters, digits and \\mathrm in a psnfss text font.

    Why: Bookman, Charter and the other psnfss text fonts have no math fonts, so loading one
    changes only the text, and a formula would still look Computer Modern. sansmath's math
    version takes its letters and digits from \\sfdefault when it is loaded; pointing that at
    the text font gives math in the font, as documents set in it (and word processors) show
    formulas. \\mathsf keeps its own font (the kernel declares it as cmss). Greek and symbols
    stay Computer Modern, as they do with sansmath (the capitals by _greek_capitals).
    """
    return (f"\\usepackage{{{package}}}", f"\\renewcommand{{\\sfdefault}}{{{family}}}",
            "\\usepackage{sansmath}", *_greek_capitals("cmr"))


# URW Gothic, the Avant Garde that the TeX packages substitute, draws [ and ] as round brackets
# (its bracketleft is a parenthesis): a formula's [x] came out as (x) under a label that says [,
# which no model can learn and the robustness row counted as the model's error. The style takes
# its small square brackets from Helvetica instead; \left[ at larger sizes comes from cmex
# as in every style.
_SQUARE_BRACKETS = (
    "\\DeclareSymbolFont{brackets}{OT1}{phv}{m}{n}",
    "\\DeclareMathDelimiter{[}{\\mathopen}{brackets}{\"5B}{largesymbols}{\"02}",
    "\\DeclareMathDelimiter{]}{\\mathclose}{brackets}{\"5D}{largesymbols}{\"03}",
)


STYLES: dict[str, Style] = {s.name: s for s in (
    Style("cm"),
    Style("times", ("\\usepackage{mathptmx}",)),
    Style("txfonts", ("\\usepackage{txfonts}",)),
    Style("palatino", ("\\usepackage{mathpazo}",)),
    Style("pxfonts", ("\\usepackage{pxfonts}",)),
    Style("euler", ("\\usepackage{euler}",)),
    Style("sans", _SANS, setup="\\sansmath "),
    Style("helvetica", ("\\usepackage[scaled=0.92]{helvet}", *_SANS, *_greek_capitals("cmss")),
          setup="\\sansmath ", revision=1),
    Style("avant", ("\\usepackage{avant}", *_SANS, *_SQUARE_BRACKETS, *_greek_capitals("cmss")),
          setup="\\sansmath ", revision=2),
    Style("bookman", _text_font_math("bookman", "pbk"), setup="\\sansmath ", revision=1),
    Style("newcent", _text_font_math("newcent", "pnc"), setup="\\sansmath ", revision=1),
    Style("charter", _text_font_math("charter", "bch"), setup="\\sansmath ", revision=1),
    Style("utopia", _text_font_math("utopia", "put"), setup="\\sansmath ", revision=1),
    Style("cm-text", display=False),
    Style("cm-10pt", size="10pt"),
    Style("cm-11pt", size="11pt"),
    Style("cm-100dpi", dpi=100),
    Style("cm-300dpi", dpi=300),
    # Anti-aliased at the output resolution, as a screen draws a formula. times-aa is the
    # robustness table's held-out one; palatino-aa gives training soft serif glyphs other than
    # cm's (with cm-aa alone in training, times-aa stayed far below clean: docs/training.md).
    Style("cm-aa", dpi=100, binary=False),
    Style("times-aa", ("\\usepackage{mathptmx}",), dpi=100, binary=False),
    Style("palatino-aa", ("\\usepackage{mathpazo}",), dpi=100, binary=False),
)}


def get_style(style: str | Style) -> Style:
    """The registered style of that name (a Style is returned as is); a clear error else."""
    if isinstance(style, Style):
        return style
    try:
        return STYLES[style]
    except KeyError:
        raise ValueError(f"unknown render style {style!r}; valid: {', '.join(STYLES)}") from None


def parse_styles(text: str) -> list[str]:
    """``"cm,times"`` -> ["cm", "times"], each checked, duplicates dropped, order kept; a
    weight suffix (``avant:3``, parse_style_weights) is allowed and left out here."""
    return list(parse_style_weights(text))


def parse_style_weights(text: str) -> dict[str, float]:
    """``"cm,times,avant:3"`` -> {"cm": 1.0, "times": 1.0, "avant": 3.0}: each style checked,
    a repeated one kept at its first place and weight.

    A weight (default 1) is how often styles_for draws that style as an extra one, relative to
    the others: a font the model reads badly can get a larger share of the images without
    rendering every formula in it. The first style is rendered for every formula, so a weight
    on it would mean nothing and is refused."""
    weights: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, w = (x.strip() for x in item.partition(":"))
        get_style(name)
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"style weight {w!r} of {name!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"style weight of {name!r} must be a positive number, not {w}")
        if sep and not weights and weight != 1.0:
            raise ValueError(f"{name!r} is the first style, rendered for every formula: "
                             "a weight on it means nothing")
        weights.setdefault(name, weight)
    if not weights:
        raise ValueError(f"no render style given; valid: {', '.join(STYLES)}")
    return weights


def styles_for(formula: str, styles: Sequence[str], extra: int, seed: int = 0,
               weights: Mapping[str, float] | None = None) -> list[str]:
    """The styles one training formula is rendered in: the first of ``styles`` always (the
    benchmark look), plus ``extra`` of the others picked by a seeded hash of the formula,
    style ``s`` with a probability that grows with ``weights[s]`` (default 1 each).

    Why not every style for every formula: the data (and rendering time) would grow by the
    number of styles, mostly repeating the same labels; a hash spreads the styles evenly over
    the formulas, gives a rebuild the same images (resumable), and ``extra`` sets the growth
    (``extra + 1``-fold) independently of how many styles exist.

    The weighted draw without replacement is Efraimidis and Spirakis's: each style gets the
    key -log(1 - u) / w for a hash-uniform u and the smallest keys win, so the first pick is
    style s with probability w_s / sum(w). With every weight 1 the keys rank as the hashes
    do, so unweighted builds pick exactly the styles they always did (their images on disk
    are reused).
    """
    first, others = styles[0], list(styles[1:])
    if extra <= 0 or not others:
        return [first]
    weights = weights or {}

    def key(s: str) -> tuple[float, bytes]:
        digest = hashlib.sha1(f"{seed}\0{s}\0{formula}".encode()).digest()
        # u from the digest's top 53 bits: exact in a float and strictly inside (0, 1); the
        # digest itself breaks ties, so equal weights order exactly as the digests do
        u = ((int.from_bytes(digest, "big") >> 107) + 0.5) / 2 ** 53
        return -math.log1p(-u) / weights.get(s, 1.0), digest

    return [first, *sorted(others, key=key)[:extra]]
