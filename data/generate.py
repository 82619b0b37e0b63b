"""Random normalized formulas: the embedded default dataset (`preprocess.py --generate N`).

A small recursive grammar writes formulas directly in the normalized token form of
`data.normalize` (so each one is a fixed point of `normalize`). Symbols are drawn with weights
taken from IM2LATEX-100K token counts (x, i, n, 2, \\mu, \\alpha are common; \\varrho is not),
so that a model trained on it sees a plausible mix, and only commands that compile with
plain LaTeX + amsmath are used, so that every formula renders.

Each function takes the `random.Random` to draw from and a token budget; the budget is a target,
not a hard limit, which spreads formula lengths from about 5 to about 80 tokens.
"""

from __future__ import annotations

import random

Tokens = list[str]

# (token, weight) tables; weights roughly follow IM2LATEX-100K frequencies.
_LOWER = tuple((c, int(w)) for c, w in (p.split(":") for p in (
    "x:14 i:18 n:13 a:11 d:11 t:10 k:9 r:9 e:9 m:8 p:8 c:7 j:7 s:7 g:6 l:5 b:5 f:5 z:5 u:4 "
    "q:4 y:4 h:3 v:3 w:2 o:1").split()))
_UPPER = tuple((c, 1) for c in "ATNSMLRBDFHPCXVGIEKQJUWZY")
_GREEK = tuple((g, w) for g, w in (
    ("\\mu", 9), ("\\alpha", 7), ("\\nu", 5), ("\\pi", 5), ("\\lambda", 5), ("\\phi", 4),
    ("\\beta", 4), ("\\delta", 4), ("\\sigma", 4), ("\\gamma", 3), ("\\theta", 3), ("\\rho", 3),
    ("\\tau", 3), ("\\psi", 3), ("\\omega", 3), ("\\epsilon", 2), ("\\eta", 2), ("\\xi", 2),
    ("\\Delta", 2), ("\\Phi", 2), ("\\Gamma", 2), ("\\Omega", 2), ("\\varphi", 1),
    ("\\Lambda", 1), ("\\chi", 1), ("\\varepsilon", 1), ("\\kappa", 1), ("\\Psi", 1),
    ("\\zeta", 1), ("\\Sigma", 1), ("\\ell", 1), ("\\hbar", 1)))
_CONSTANTS = (("\\infty", 3), ("\\partial", 4), ("\\nabla", 1))
_BINARY = (("+", 20), ("-", 22), ("\\pm", 2), ("\\times", 1), ("\\cdot", 1), ("/", 3),
           ("\\otimes", 1), ("\\wedge", 1), ("\\circ", 1))
_RELATIONS = (("=", 40), ("\\leq", 2), ("\\geq", 1), ("<", 2), (">", 1), ("\\neq", 1),
              ("\\approx", 1), ("\\equiv", 2), ("\\sim", 1), ("\\simeq", 1), ("\\to", 1),
              ("\\rightarrow", 2), ("\\in", 2), ("\\subset", 1), ("\\propto", 1))
_ACCENTS = (("\\bar", 7), ("\\hat", 6), ("\\tilde", 5), ("\\vec", 3), ("\\dot", 3),
            ("\\overline", 2), ("\\widetilde", 1), ("\\ddot", 1), ("\\widehat", 1),
            ("\\underline", 1), ("\\check", 1))
_FONTS = (("\\mathrm", 6), ("\\mathcal", 3), ("\\mathbf", 3), ("\\boldsymbol", 1))
_FUNCTIONS = (("\\exp", 5), ("\\ln", 5), ("\\sin", 4), ("\\cos", 4), ("\\log", 3),
              ("\\tan", 1), ("\\det", 1), ("\\sinh", 1), ("\\cosh", 1), ("\\max", 1),
              ("\\min", 1), ("\\dim", 1))
_WORDS = ("d", "e", "i", "T r", "m a x", "m i n", "e f f", "t o t", "d e t", "c o s", "s i n",
          "c o n s t")
_CONNECTIVES = ("f o r", "i f", "a n d", "o r", "w i t h")
_SPACES = (("\\,", 4), ("\\quad", 4), ("\\qquad", 2), ("\\;", 1), ("\\!", 1), ("\\:", 1))
_DELIMITERS = (("(", ")", 12), ("[", "]", 3), ("\\{", "\\}", 1), ("|", "|", 2),
               ("\\left(", "\\right)", 10), ("\\left[", "\\right]", 3),
               ("\\left\\{", "\\right\\}", 1), ("\\left|", "\\right|", 1),
               ("\\langle", "\\rangle", 1), ("\\left\\langle", "\\right\\rangle", 1))
_BIG_OPERATORS = (("\\sum", 6), ("\\int", 6), ("\\prod", 2), ("\\lim", 2), ("\\oint", 1),
                  ("\\bigcup", 1), ("\\bigoplus", 1))
_MATRICES = (("\\left(", "\\begin{array}", "\\end{array}", "\\right)", 3),
             ("\\left[", "\\begin{array}", "\\end{array}", "\\right]", 1),
             ("", "\\begin{pmatrix}", "\\end{pmatrix}", "", 2),
             ("\\left(", "\\begin{matrix}", "\\end{matrix}", "\\right)", 2),
             ("", "\\begin{bmatrix}", "\\end{bmatrix}", "", 1))


def _pick(rng: random.Random, table: tuple) -> tuple | str:
    """One row of a weighted table (the weight is the last field of each row)."""
    row = rng.choices(table, weights=[r[-1] for r in table])[0]
    return row[0] if len(row) == 2 else row[:-1]


def _braced(tokens: Tokens) -> Tokens:
    return ["{", *tokens, "}"]


def _number(rng: random.Random) -> Tokens:
    digits = [rng.choice("1112223456789")]
    digits += rng.choices("0123456789", k=rng.choice((0, 0, 0, 0, 0, 1, 1, 2)))
    if rng.random() < 0.1:
        digits = ["0", "."] + digits if rng.random() < 0.5 else [*digits, ".", rng.choice("05")]
    return digits


def _symbol(rng: random.Random) -> Tokens:
    r = rng.random()
    if r < 0.55:
        return [_pick(rng, _LOWER)]
    if r < 0.72:
        return [_pick(rng, _UPPER)]
    if r < 0.95:
        return [_pick(rng, _GREEK)]
    return [_pick(rng, _CONSTANTS)]


def _index(rng: random.Random) -> Tokens:
    """A short subscript: `i`, `i j`, `0`, `\\mu \\nu`, `i = 1`, `n - 1`, `\\mathrm { e f f }`."""
    r = rng.random()
    if r < 0.4:
        return [rng.choice("ijknm0123")]
    if r < 0.55:
        return [rng.choice("ijkabmn"), rng.choice("ijklbn")]
    if r < 0.7:
        return rng.sample(["\\mu", "\\nu", "\\alpha", "\\beta", "\\rho", "\\sigma"], 2)[:
                          rng.choice((1, 2))]
    if r < 0.8:
        return [rng.choice("ink"), rng.choice("+-"), "1"]
    if r < 0.9:
        return ["\\mathrm", *_braced(rng.choice(_WORDS[3:8]).split())]
    return [_pick(rng, _UPPER)] if rng.random() < 0.5 else [rng.choice("xyzt")]


def _power(rng: random.Random, budget: int) -> Tokens:
    """A superscript: mostly `2`, `\\prime`, `- 1`, `n`; sometimes a small expression."""
    r = rng.random()
    if r < 0.35:
        return [rng.choice("2223n4")]
    if r < 0.5:
        return ["\\prime"] * rng.choice((1, 1, 1, 2))
    if r < 0.62:
        return ["-", rng.choice("12n")]
    if r < 0.7:
        return [rng.choice(("\\dagger", "*", "T", "\\ast"))]
    if budget > 4:
        return _expr(rng, min(budget, 6))
    return [_pick(rng, _LOWER)]


def _scripted(rng: random.Random, budget: int) -> Tokens:
    """A symbol with an optional subscript and/or superscript."""
    base = _symbol(rng)
    r = rng.random()
    if r < 0.35 or budget < 3 or base[0] in ("\\infty", "\\partial", "\\nabla"):
        return base
    if r < 0.6:
        return [*base, "_", *_braced(_index(rng))]
    if r < 0.82:
        return [*base, "^", *_braced(_power(rng, budget - 3))]
    return [*base, "_", *_braced(_index(rng)), "^", *_braced(_power(rng, budget - 6))]


def _frac(rng: random.Random, budget: int) -> Tokens:
    if rng.random() < 0.15:
        top, bottom = ["\\partial", *_scripted(rng, 2)], ["\\partial", *_symbol(rng)]
        if rng.random() < 0.3:
            top, bottom = ["d"], ["d", rng.choice("txrsz")]
    else:
        half = max(1, (budget - 6) // 2)
        top = _expr(rng, rng.randint(1, half)) if rng.random() < 0.8 else ["1"]
        bottom = _expr(rng, rng.randint(1, half))
    frac = ["\\frac", *_braced(top), *_braced(bottom)]
    return _braced(frac) if rng.random() < 0.15 else frac  # `{ \frac .. }`, as in the data


def _sqrt(rng: random.Random, budget: int) -> Tokens:
    root = ["[", rng.choice("3n4"), "]"] if rng.random() < 0.15 else []
    return ["\\sqrt", *root, *_braced(_expr(rng, max(1, budget - 3)))]


def _accent(rng: random.Random, budget: int) -> Tokens:
    accent = _pick(rng, _ACCENTS)
    wide = accent in ("\\overline", "\\widetilde", "\\widehat", "\\underline")
    body = _expr(rng, min(budget - 2, 5)) if wide and budget > 4 else _symbol(rng)
    out = [accent, *_braced(body)]
    if rng.random() < 0.4:
        out += ["_", *_braced(_index(rng))]
    return out


def _font(rng: random.Random) -> Tokens:
    font = _pick(rng, _FONTS)
    if font == "\\mathcal":
        body = [_pick(rng, _UPPER)]
    elif font == "\\mathrm":
        body = rng.choice(_WORDS).split()
    else:
        body = [rng.choice((_pick(rng, _LOWER), _pick(rng, _UPPER)))]
    out = [font, *_braced(body)]
    if rng.random() < 0.3:
        out += ["_", *_braced(_index(rng))]
    return out


def _delimited(rng: random.Random, budget: int) -> Tokens:
    left, right = _pick(rng, _DELIMITERS)
    out = [left, *_expr(rng, max(1, budget - 2)), right]
    if rng.random() < 0.2:
        out += ["^", *_braced(_power(rng, 3))]
    return out


def _function(rng: random.Random, budget: int) -> Tokens:
    """`\\sin ( x )`, `f ( x , t )`, `\\exp \\left( .. \\right)`, `\\lim _ { x \\to 0 }`."""
    r = rng.random()
    if r < 0.4:
        name = [rng.choice("fgFGVhHuAZ")]
        if rng.random() < 0.3:
            name += ["_", *_braced(_index(rng))]
        args = [rng.choice("xtrkpqz")]
        for _ in range(rng.choice((0, 0, 1, 2))):
            args += [",", rng.choice("xtyzs")]
        return [*name, "(", *args, ")"]
    name = [_pick(rng, _FUNCTIONS)]
    if rng.random() < 0.25:
        name += ["^", *_braced([rng.choice("2-")] if rng.random() < 0.8 else ["-", "1"])]
    if rng.random() < 0.35:
        return [*name, *_scripted(rng, 2)]
    return [*name, *_delimited(rng, max(3, budget - len(name)))]


def _big_operator(rng: random.Random, budget: int) -> Tokens:
    op = _pick(rng, _BIG_OPERATORS)
    var = rng.choice("ijknx")
    if op == "\\lim":
        out = [op, "_", *_braced([rng.choice("xnt"), "\\to", rng.choice(("0", "\\infty"))])]
    elif op in ("\\int", "\\oint"):
        limits = rng.random()
        if limits < 0.45:
            out = [op, "_", *_braced(["0"] if rng.random() < 0.6 else ["-", "\\infty"]),
                   "^", *_braced([rng.choice(("\\infty", "1", "t", "L", "T"))])]
        elif limits < 0.6:
            out = [op, "_", *_braced([_pick(rng, _UPPER)])]
        else:
            out = [op]
        var = rng.choice("xtkrsz")
        body = _expr(rng, max(1, budget - len(out) - 2))
        return [*out, *body, "d", var]
    else:
        lower = [var, "=", rng.choice("01")] if rng.random() < 0.7 else [var]
        out = [op, "_", *_braced(lower)]
        if rng.random() < 0.7:
            out += ["^", *_braced([rng.choice(("n", "N", "\\infty", "k", "M"))])]
    return [*out, *_term(rng, max(1, budget - len(out)))]


def _matrix(rng: random.Random) -> Tokens:
    """A small matrix, vector or `\\begin{cases}` with short cells."""
    if rng.random() < 0.15:
        conditions = ("\\mathrm { i f } x > 0", "x < 0", "t \\geq 0",
                      "\\mathrm { o t h e r w i s e }")
        body = [*_expr(rng, 3), "&", *rng.choice(conditions[:3]).split(), "\\\\",
                *_expr(rng, 3), "&", *rng.choice(conditions[1:]).split()]
        return ["\\left\\{", "\\begin{array}", "{", "l", "l", "}", *body, "\\end{array}",
                "\\right."] if rng.random() < 0.5 else ["\\begin{cases}", *body, "\\end{cases}"]
    n_rows, n_cols = rng.choice(((2, 2), (2, 2), (3, 3), (2, 1), (3, 1), (1, 3), (2, 3)))
    left, begin, end, right = _pick(rng, _MATRICES)
    cells = [[_expr(rng, rng.choice((1, 1, 2, 3))) for _ in range(n_cols)]
             for _ in range(n_rows)]
    body: Tokens = []
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            body += cell + (["&"] if c < n_cols - 1 else [])
        if r < n_rows - 1:
            body.append("\\\\")
    spec = ["{", *(rng.choice("ccccl") * n_cols), "}"] if begin == "\\begin{array}" else []
    return [tok for tok in (left, begin, *spec, *body, end, right) if tok]


def _atom(rng: random.Random, budget: int) -> Tokens:
    """One factor; composite kinds only when the budget leaves room for them."""
    kinds = [(_scripted, 30), (_number_atom, 8), (_font_atom, 4)]
    if budget >= 4:
        kinds += [(_function, 10), (_accent, 7), (_delimited, 10)]
    if budget >= 7:
        kinds += [(_frac, 12), (_sqrt, 3), (_big_operator, 5)]
    if budget >= 14:
        kinds += [(_matrix_atom, 1)]
    make = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
    return make(rng, budget)


def _number_atom(rng: random.Random, budget: int) -> Tokens:
    return _number(rng)


def _font_atom(rng: random.Random, budget: int) -> Tokens:
    return _font(rng)


def _matrix_atom(rng: random.Random, budget: int) -> Tokens:
    return _matrix(rng)


def _term(rng: random.Random, budget: int) -> Tokens:
    """A product of factors, juxtaposed (`2 \\pi i`), sometimes with a thin space."""
    out = _atom(rng, budget)
    while len(out) < budget and rng.random() < 0.6:
        factor = _atom(rng, budget - len(out))
        if factor[0].isdigit():  # `x 2` reads as a typo; numbers lead a product
            continue
        if rng.random() < 0.08:
            out.append("\\,")
        out += factor
    return out


def _expr(rng: random.Random, budget: int) -> Tokens:
    """Terms joined by binary operators, sometimes with a leading minus."""
    out = ["-"] if rng.random() < 0.1 else []
    out += _term(rng, rng.randint(1, max(1, budget)))
    while len(out) < budget:
        out.append(_pick(rng, _BINARY))
        out += _term(rng, rng.randint(1, max(1, budget - len(out))))
    return out


def _formula(rng: random.Random, budget: int) -> Tokens:
    """A whole formula: mostly an equation or relation chain, with optional punctuation and a
    `\\quad` side condition."""
    r = rng.random()
    if r < 0.2 or budget < 5:
        out = _expr(rng, budget)
    else:
        n_sides = 3 if r > 0.85 and budget > 20 else 2
        out = _expr(rng, max(1, budget // (2 * n_sides)))
        for _ in range(n_sides - 1):
            out += [_pick(rng, _RELATIONS), *_expr(rng, max(1, (budget - len(out)) // 2 + 1))]
    if budget > 12 and rng.random() < 0.12:
        out += [",", _pick(rng, _SPACES)]
        if rng.random() < 0.5:
            out += ["\\mathrm", *_braced(rng.choice(_CONNECTIVES).split()), "\\,"]
        out += [*_scripted(rng, 3), _pick(rng, _RELATIONS), *_expr(rng, 3)]
    if rng.random() < 0.25:
        out.append(rng.choice((",", ".", ",", ".", ";")))
    return out


def generate_formulas(n: int, seed: int = 0) -> list[str]:
    """`n` distinct random normalized formulas, the same list for the same seed."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        budget = round(rng.triangular(3, 85, 30))
        tokens = _formula(rng, budget)
        if not 5 <= len(tokens) <= 120:
            continue
        f = " ".join(tokens)
        if f not in seen:
            seen.add(f)
            out.append(f)
    if len(out) < n:
        raise RuntimeError(f"generated only {len(out)} distinct formulas of {n}")
    return out
