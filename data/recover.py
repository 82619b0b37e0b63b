r"""Corpus formulas that strict rendering would drop, recovered where the meaning is standard.

Why: in a seeded sample of the training corpus 36.7% of formulas failed to render, 96% of them
on an undefined control sequence (bench/render_failures.py, docs/results/render_failures.txt):
macros of standard packages that the IM2LATEX preamble does not load (``\mathbb``, ``\bm``,
``\mathscr``, ``\lesssim``) and authors' shorthands (``\R``, ``\norm{x}``, ``\la``). Two
remedies, both for training formulas only (the fixed val/test sets are normalized and rendered
exactly as before, so scores stay comparable):

- ``recover``: rewrites a shorthand into the standard LaTeX it almost always stands for, on
  the normalized tokens, so the label is the rewritten form and label and image agree
  (``\R`` -> ``\mathbb { R }``, ``\norm { x }`` -> ``\| x \|``, ``\bm`` -> ``\boldsymbol``:
  the same image, one spelling for the model to learn);
- ``TRAIN_PACKAGES``: packages of Debian's TeX Live added to the training renders' preamble,
  whose macros keep their own name in the label (``\mathbb``, ``\mathscr``, ``\lesssim``).

Only shorthands common in the failure list, with one dominant meaning, are rewritten;
single-letter-ish names with several meanings (``\p``, ``\D``, ``\x``, ``\bx``) are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from data.styles import Style, get_style

# Preamble lines after a style's own, for training renders (data.build). amssymb loads
# amsfonts, which would change what formulas without its macros look like: it gives \hbar,
# \angle and \rightleftharpoons other glyphs and scales cmex in sub/superscripts (what
# amsmath's [cmex10] turned off); both are put back, so a formula that renders without these
# lines renders pixel-identically with them (tests/test_recover.py, on every style).
_KEPT = ("hbar", "angle", "rightleftharpoons")  # robust commands: \\NAME and "\\NAME "


def _copy(dst: str, src: str) -> str:
    r"""\let a robust command and its inner "\NAME " macro (which amsfonts undefines)."""
    return (f"\\let\\{dst}\\{src}\\expandafter\\let\\csname {dst} \\expandafter\\endcsname"
            f"\\csname {src} \\endcsname")


TRAIN_PACKAGES = (
    "\\makeatletter" + "".join(_copy(f"imx@{n}", n) for n in _KEPT) + "\\makeatother",
    "\\usepackage{amssymb}",
    "\\usepackage{mathrsfs}",
    "\\makeatletter" + "".join(_copy(n, f"imx@{n}") for n in _KEPT) + "\\makeatother",
    "\\DeclareFontShape{OMX}{cmex}{m}{n}{<->sfixed*cmex10}{}",
    "\\expandafter\\let\\csname OMX/cmex/m/n/10\\endcsname\\relax",
)



def train_style(style: str | Style) -> Style:
    """The style with ``TRAIN_PACKAGES`` after its own packages: how training formulas render."""
    style = get_style(style)
    return replace(style, packages=(*style.packages, *TRAIN_PACKAGES))


_BB = {f"\\{c}": ["\\mathbb", "{", c, "}"] for c in "RCNZQ"}
_BB.update({f"\\{c}{c}": ["\\mathbb", "{", c, "}"] for c in "RCNZQEP"})
_OPERATORS = {"\\Tr": "Tr", "\\tr": "tr", "\\Var": "Var", "\\id": "id", "\\dist": "dist"}

# Shorthand -> the tokens it stands for.
REPLACE: dict[str, list[str]] = {
    **_BB,
    "\\E": ["\\mathbb", "{", "E", "}"],
    **{k: ["\\operatorname", "{", *v, "}"] for k, v in _OPERATORS.items()},
    "\\argmin": ["\\operatorname*", "{", *"arg", "\\,", *"min", "}"],
    "\\argmax": ["\\operatorname*", "{", *"arg", "\\,", *"max", "}"],
    "\\la": ["\\langle"],
    "\\ra": ["\\rangle"],
    "\\eps": ["\\varepsilon"],
    "\\dd": ["\\mathrm", "{", "d", "}"],
    "\\ud": ["\\mathrm", "{", "d", "}"],
    "\\bm": ["\\boldsymbol"],
    "\\wt": ["\\widetilde"],
    "\\wh": ["\\widehat"],
    "\\ol": ["\\overline"],
    "\\mathds": ["\\mathbb"],
    "\\mathbbm": ["\\mathbb"],
    **{f"\\c{c}": ["\\mathcal", "{", c, "}"] for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
}
# Shorthand with one argument -> (tokens before, tokens after) it.
WRAP: dict[str, tuple[list[str], list[str]]] = {
    "\\norm": (["\\|"], ["\\|"]),
    "\\abs": (["|"], ["|"]),
    "\\ket": (["|"], ["\\rangle"]),
    "\\bra": (["\\langle"], ["|"]),
}
# Invisible in an image: dropped like \nonumber.
DROP = frozenset({"\\nn"})
# Rewritten only together: a lone \la is as often \lambda (``\Pi _ { \al \la }``).
_PAIRED = {"\\la": "\\ra", "\\ra": "\\la"}
# The name a rewrite is counted under where one rule covers a family of shorthands.
_RULE = {f"\\c{c}": "\\cX" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def _argument(tokens: Sequence[str], i: int) -> tuple[list[str], int] | None:
    """The argument starting at tokens[i] (a braced group's inside, or one token) and the
    index after it; None where there is none (end of formula, a closing brace, a script)."""
    if i >= len(tokens) or tokens[i] in ("}", "^", "_", "&", "\\\\"):
        return None
    if tokens[i] != "{":
        return [tokens[i]], i + 1
    depth = 0
    for j in range(i, len(tokens)):
        depth += (tokens[j] == "{") - (tokens[j] == "}")
        if depth == 0:
            return list(tokens[i + 1 : j]), j + 1
    return None


def recover(formula: str) -> tuple[str, list[str]]:
    """The normalized formula with its shorthands rewritten, and the shorthands it had (in
    order, repeats kept once; ``\\cA``..``\\cZ`` all as ``\\cX``). A formula without any
    comes back unchanged."""
    tokens = formula.split()
    lone = {t for t, partner in _PAIRED.items() if t in tokens and partner not in tokens}
    if not any((t in REPLACE and t not in lone) or t in WRAP or t in DROP for t in tokens):
        return formula, []
    out: list[str] = []
    used: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        arg = _argument(tokens, i + 1) if t in WRAP else None
        if t in REPLACE and t not in lone:
            out += REPLACE[t]
        elif arg is not None:
            inner, i = arg
            before, after = WRAP[t]
            inner_text, inner_used = recover(" ".join(inner))
            out += [*before, *inner_text.split(), *after]
            used += [_RULE.get(t, t), *inner_used]
            continue
        elif t not in DROP:
            out.append(t)
            i += 1
            continue
        used.append(_RULE.get(t, t))
        i += 1
    return " ".join(out), list(dict.fromkeys(used))
