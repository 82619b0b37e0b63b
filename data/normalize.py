r"""LaTeX formula <-> the normalized token form of IM2LATEX-100K.

The normalized form is one formula per line, tokens separated by single spaces:

    \frac { a } { b }   x _ { i } ^ { 2 }   \mathrm { s i n }   \left( x \right.

Every character is its own token (so numbers and words are split into digits and letters),
a control sequence is one token, and a few pairs TeX reads as one unit are glued into one token:
`\left(` / `\right.` / `\middle|`, `\begin{array}` / `\end{array}`, `\operatorname*`.
A control space `\ ` is the token `\` (the separating space completes it), so `str.split()` of
a normalized line gives back exactly its tokens.

What normalizing changes (nothing that changes the rendered image):
- outer `$...$`, `$$...$$`, `\[...\]`, `\(...\)` and `equation`/`displaymath` wrappers go;
- comments, `\label{...}`, `\nonumber` and `\notag` go;
- spaces go in math mode; in text mode (`\text{...}`, `\mbox{...}`, ...) a run of spaces
  becomes the token `~`, which renders as the same space;
- a one-token sub/superscript gets braces (`x^2` -> `x ^ { 2 }`, `x^\frac12` ->
  `x ^ { \frac 1 2 }`); other macro arguments keep their form, like the reference data
  (`\frac 1 2` stays);
- `{a \over b}` becomes `{ \frac { a } { b } }` (the `\frac` of the reference data).
Unknown macros are kept as tokens: they fail to render and the dataset builder drops them.

Spaces are TeX spaces in raw input but token separators in normalized input. A formula is read
as already normalized when every whitespace-separated chunk of it is a single token; that keeps
`normalize` a fixed point on its own output even inside text-mode groups (`\text { o r }`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class NormalizeError(ValueError):
    """A formula that cannot be tokenized faithfully (e.g. unbalanced braces); the message is
    short enough to serve as the reason a dataset builder drops the line."""


# One token per match. Pairs TeX reads as one unit come first: `\left(`, `\begin{array}`,
# `\operatorname*`; a comment takes its line end and the next line's indentation along, as in TeX.
_LEX = re.compile(r"""
    \\(?:left|right|middle)(?![a-zA-Z])\s*(?:\\[a-zA-Z]+|\\[^a-zA-Z\s]|[^{}\s\\%])
  | \\(?:begin|end)\s*\{\s*[a-zA-Z]+\*?\s*\}
  | \\operatorname\s*\*
  | %[^\n]*\n?[ \t]*
  | \\[a-zA-Z]+ | \\. | \s+ | ---? | .
""", re.S | re.X)
_SPACE = " "  # marker for a run of whitespace while lexing
_CONTROL_SPACE = "\\"

_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))
_ENV_WRAPPER = re.compile(r"\\begin\s*\{(equation\*?|displaymath|math)\}(.*)\\end\s*\{\1\}", re.S)

_DROPPED = frozenset({"\\nonumber", "\\notag"})
_DROPPED_WITH_ARG = frozenset({"\\label"})
_INVISIBLE = _DROPPED | _DROPPED_WITH_ARG
_VERBATIM = frozenset({"\\verb"})
_MATH, _TEXT, _INLINE = 0, 1, 2  # modes while reading spaces; _INLINE: math inside text

# Their braced argument is typeset in text mode, where spaces are visible.
_TEXT_COMMANDS = frozenset(
    "\\" + c for c in (
        "text textrm textbf textit textsf texttt textsl textsc textup textnormal textmd "
        "emph mbox hbox fbox makebox framebox intertext textsuperscript textsubscript tag"
    ).split())

# Mandatory argument count (and whether an optional [..] comes first) of the macros that can
# follow ^ or _ , so that `x^\frac12` is braced as a whole.
_ARITY: dict[str, tuple[int, bool]] = {
    **{"\\" + c: (2, False) for c in (
        "frac dfrac tfrac cfrac binom dbinom tbinom stackrel overset underset textcolor "
        "colorbox raisebox sideset").split()},
    **{"\\" + c: (1, True) for c in "sqrt xrightarrow xleftarrow".split()},
    **{"\\" + c: (1, False) for c in (
        "hat bar vec tilde dot ddot dddot check breve acute grave mathring widehat widetilde "
        "overline underline overrightarrow overleftarrow overleftrightarrow overbrace "
        "underbrace mathrm mathbf mathit mathsf mathtt mathcal mathbb mathfrak mathscr "
        "boldsymbol bm pmb text textrm textbf textit textsf texttt textup textnormal mbox hbox "
        "fbox emph operatorname operatorname* mathop mathbin mathrel mathord mathopen "
        "mathclose mathpunct mathinner phantom vphantom hphantom smash boxed cancel substack "
        "ensuremath").split()},
    "\\genfrac": (6, False),
}

# Environments whose first braced group is an argument (the column spec), not content.
_ENV_ARGS = {"array": 1, "subarray": 1, "tabular": 1, "alignedat": 1, "alignat": 1,
             "alignat*": 1}
_ROW_BREAKS = frozenset({"&", "\\\\", "\\cr"})
_NOT_AN_ARGUMENT = frozenset({"^", "_", "&", "\\\\", "}"})
_NOT_A_BRACE = re.compile(r"\\[{}]|[^{}]")


def _is_control_word(tok: str) -> bool:
    return len(tok) > 1 and tok[0] == "\\" and tok[1].isalpha()


# ---------------------------------------------------------------------------------------------
# raw string -> flat tokens


def strip_math_wrappers(s: str) -> str:
    r"""The formula without the math-mode wrappers that enclose it whole (`$..$`, `\[..\]`,
    `\begin{equation}..`, repeatedly: `$\[x\]$`), for a renderer that adds its own."""
    while True:
        s = s.strip()
        m = _ENV_WRAPPER.fullmatch(s)
        if m:
            s = m.group(2)
            continue
        for a, b in _WRAPPERS:
            inner = _unwrap(s, a, b)
            if inner is not None:
                s = inner
                break
        else:
            return s


def _unwrap(s: str, a: str, b: str) -> str | None:
    """`s` without the wrapper a...b, or None. A `$...$` may be followed by punctuation outside
    it (`$x$,` in DLMF), which moves inside: a comma looks the same in math mode."""
    tail = ""
    if a == "$" and s[-1:] in ".,;:" and s[-2:-1] == "$":
        s, tail = s[:-1], s[-1]
    if len(s) < len(a) + len(b) or not (s.startswith(a) and s.endswith(b)):
        return None
    inner = s[len(a):len(s) - len(b)]
    if a.startswith("$") and re.search(r"(?<!\\)\$", inner):
        return None  # `$a$ and $b$` is not one wrapped formula
    if inner.endswith("\\") and not inner.endswith("\\\\"):
        return None  # `$x\$` ends with an escaped dollar
    return inner + tail


def _lex(s: str) -> tuple[list[str], bool]:
    """Tokens with `_SPACE` markers where the source had whitespace, and whether the source
    already looks normalized (every token stands alone between spaces)."""
    out: list[str] = []
    normalized = True
    separated = True  # is the next token separated from the previous one?
    for t in _LEX.findall(s):
        c = t[0]
        if c == "\\":
            if len(t) == 1 or t[1].isspace():
                t = _CONTROL_SPACE
            elif t in _VERBATIM:
                raise NormalizeError("verbatim (\\verb) is not supported")
            elif len(t) > 5 and len(t.split()) > 1:
                t = "".join(t.split())  # `\left (` -> `\left(`
        elif c == "%":
            normalized = False
            continue
        elif c.isspace():
            out.append(_SPACE)
            separated = True
            continue
        normalized = normalized and separated
        separated = t == _CONTROL_SPACE  # its own space separates it
        out.append(t)
    return out, normalized


def _resolve_spaces(lexed: list[str], normalized: bool) -> list[str]:
    r"""Drop space markers, except in text mode of raw input where a run of them is `~`.

    Mirrors TeX's own rules: spaces after a control word or control space are skipped and a
    run of spaces is one space. Text mode is the argument of a text command, or what follows a
    `$` in math mode (an array cell `a $ \quad $ b`, or a line of text with inline math)."""
    if normalized or (_TEXT_COMMANDS.isdisjoint(lexed) and "$" not in lexed):
        return [t for t in lexed if t != _SPACE]
    out: list[str] = []
    mode = [_TEXT if "$" in lexed and _top_level_dollar(lexed) else _MATH]  # per brace level
    pending = False  # a text command waits for its braced argument
    in_opt = False  # inside the [..] option of a text command (\makebox[2cm]{..})
    skip = True
    for t in lexed:
        if t == _SPACE:
            if mode[-1] == _TEXT and not skip:
                out.append("~")
                skip = True
            continue
        skip = _is_control_word(t) or t == _CONTROL_SPACE
        if t == "{":
            mode.append(_TEXT if mode[-1] == _TEXT or (pending and not in_opt) else _MATH)
            pending = in_opt and pending
        elif t == "}":
            if len(mode) > 1:
                mode.pop()
        elif t == "$":
            mode[-1] = _after_dollar(mode[-1], bool(out) and out[-1] == "{")
        elif t == "\\(" and mode[-1] == _TEXT:
            mode[-1] = _INLINE
        elif t == "\\)" and mode[-1] == _INLINE:
            mode[-1] = _TEXT
        elif t in _TEXT_COMMANDS:
            pending = True
        elif pending and t == "[" and not in_opt:
            in_opt = True
        elif pending and in_opt:
            in_opt = t != "]"
        else:
            pending = False
        out.append(t)
    return out


def _top_level_dollar(lexed: list[str]) -> bool:
    """Is there a `$` outside every group and environment? Then the line is text with inline
    math (`$a>0$, $c>0$.` in DLMF), not a formula."""
    depth = 0
    for t in lexed:
        if t == "{" or t.startswith("\\begin{"):
            depth += 1
        elif t == "}" or t.startswith("\\end{"):
            depth -= 1
        elif t == "$" and depth == 0:
            return True
    return False


def _after_dollar(mode: int, after_brace: bool) -> int:
    """The mode after a `$`. In math mode, `{$` opens the math of a text box argument whose
    command we do not know (`\resizebox{..}{..}{$x$}`); any other `$` there ends an array
    cell's math, so text follows."""
    if mode == _MATH:
        return _MATH if after_brace else _TEXT
    return _TEXT if mode == _INLINE else _INLINE


# ---------------------------------------------------------------------------------------------
# rewrites of the flat token list


def _check_braces(tokens: list[str]) -> None:
    """Raise unless braces balance: TeX could not read the formula either."""
    braces = _NOT_A_BRACE.sub("", " ".join(tokens))
    while "{}" in braces:
        braces = braces.replace("{}", "")
    if braces:
        raise NormalizeError("unbalanced braces: " + (
            "unexpected }" if braces[0] == "}" else "missing }"))


def _group_end(tokens: list[str], i: int, open_: str = "{", close: str = "}") -> int:
    """Index just past the group opened at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        depth += (tokens[j] == open_) - (tokens[j] == close)
        if depth == 0:
            return j + 1
    return len(tokens)


def _arg_end(tokens: list[str], i: int) -> int:
    r"""End (exclusive) of the TeX argument starting at tokens[i], counting a macro's own
    arguments, so that a whole `\frac 1 2` becomes one braced superscript."""
    t = tokens[i]
    if t == "{":
        return _group_end(tokens, i)
    if t not in _ARITY:
        return i + 1
    n_args, optional = _ARITY[t]
    j = i + 1
    if optional and j < len(tokens) and tokens[j] == "[":
        j = _group_end(tokens, j, "[", "]")
    for _ in range(n_args):
        if j < len(tokens):
            j = _group_end(tokens, j) if tokens[j] == "{" else j + 1
    return j


def _drop_invisible(tokens: list[str]) -> list[str]:
    r"""Remove `\label{..}`, `\nonumber`, `\notag`: they never show in a formula's image."""
    if _INVISIBLE.isdisjoint(tokens):
        return tokens
    out = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _DROPPED_WITH_ARG:
            i = _arg_end(tokens, i + 1) if i + 1 < len(tokens) else i + 1
            continue
        if t not in _DROPPED:
            out.append(t)
        i += 1
    return out


def _brace_scripts(tokens: list[str]) -> list[str]:
    """`x ^ 2` -> `x ^ { 2 }`: a sub/superscript argument always in braces."""
    if "^" not in tokens and "_" not in tokens:
        return tokens
    out: list[str] = []
    done = 0  # tokens[:done] are in out
    for p in [i for i, t in enumerate(tokens) if t == "^" or t == "_"]:
        i = p + 1
        if i < done or i >= len(tokens):
            continue
        nxt = tokens[i]
        if nxt == "{" or nxt in _NOT_AN_ARGUMENT or _closer(nxt) or _is_close(nxt):
            continue
        j = _arg_end(tokens, i)
        out += tokens[done:i]
        out.append("{")
        out += _brace_scripts(tokens[i:j])
        out.append("}")
        done = j
    return out + tokens[done:]


# ---------------------------------------------------------------------------------------------
# \over -> \frac, on a tree of groups (the scope of \over is its enclosing group)


class _Node(list):
    r"""A group of items: a brace group, a `\left..\right` pair, or an environment."""

    __slots__ = ("open", "close")

    def __init__(self, open_: str, close: str = "", items=()):
        super().__init__(items)
        self.open, self.close = open_, close


def _parse(tokens: list[str]) -> _Node:
    """A tree of brace groups (braces are known to balance)."""
    stack = [_Node("")]
    for t in tokens:
        if t == "{":
            node = _Node("{", "}")
            stack[-1].append(node)
            stack.append(node)
        elif t == "}":
            stack.pop()
        else:
            stack[-1].append(t)
    return _nest_delimiters(stack[0])


def _closer(t: str) -> str | None:
    r"""What closes the group an opening token starts (`\right` for any `\left`), or None."""
    if t.startswith("\\left") and len(t) > 5 and not t[5].isalpha():
        return "\\right"
    if t.startswith("\\begin{"):
        return "\\end" + t[6:]
    return None


def _is_close(t: str) -> bool:
    return (t.startswith("\\right") and len(t) > 6 and not t[6].isalpha()) or t.startswith(
        "\\end{")


def _nest_delimiters(node: _Node) -> _Node:
    r"""Nest `\left..\right` and `\begin..\end` inside each brace group. Mismatched ones (TeX
    would fail anyway) leave the group flat, so that such a formula is still tokenized."""
    children = [_nest_delimiters(it) if isinstance(it, _Node) else it for it in node]
    stack = [_Node(node.open, node.close)]
    waiting: list[str] = []
    for it in children:
        close = _closer(it) if isinstance(it, str) else None
        if close is not None:
            child = _Node(it)
            stack[-1].append(child)
            stack.append(child)
            waiting.append(close)
        elif isinstance(it, str) and _is_close(it):
            if not waiting or not it.startswith(waiting[-1]) or (
                    waiting[-1] != "\\right" and it != waiting[-1]):
                return _Node(node.open, node.close, children)
            stack.pop().close = it
            waiting.pop()
        else:
            stack[-1].append(it)
    return stack[0] if not waiting else _Node(node.open, node.close, children)


def _flatten(node: _Node, out: list[str]) -> list[str]:
    for it in node:
        if isinstance(it, _Node):
            out.append(it.open)
            _flatten(it, out)
            if it.close:
                out.append(it.close)
        else:
            out.append(it)
    return out


def _env_arg_count(open_: str, items: list) -> int:
    """How many leading items of an environment are its arguments (`[t]`, `{cc}`)."""
    if not open_.startswith("\\begin{"):
        return 0
    n = _ENV_ARGS.get(open_[7:-1], 0)
    i = items.index("]") + 1 if n and items[:1] == ["["] and "]" in items else 0
    return min(i + n, len(items))


def _over_to_frac(node: _Node) -> _Node:
    r"""`a \over b` -> `\frac { a } { b }` within each cell (between `&`, `\\`, `\middle`)."""
    items = [_over_to_frac(it) if isinstance(it, _Node) else it for it in node]
    if "\\over" in items:
        start = _env_arg_count(node.open, items)
        out, cell = items[:start], []
        for it in items[start:] + [None]:
            if it is None or (isinstance(it, str) and (
                    it in _ROW_BREAKS or it.startswith("\\middle"))):
                if cell.count("\\over") == 1 and "\\buildrel" not in cell:  # `\buildrel a \over =`
                    k = cell.index("\\over")
                    cell = ["\\frac", _Node("{", "}", cell[:k]), _Node("{", "}", cell[k + 1:])]
                out += cell if it is None else cell + [it]
                cell = []
            else:
                cell.append(it)
        items = out
    return _Node(node.open, node.close, items)


# ---------------------------------------------------------------------------------------------
# public API


def tokenize(latex: str) -> list[str]:
    """Normalized tokens of a raw or already normalized formula (see the module docstring).

    Raises NormalizeError for input that cannot be tokenized faithfully."""
    lexed, normalized = _lex(strip_math_wrappers(latex))
    tokens = _resolve_spaces(lexed, normalized)
    _check_braces(tokens)
    tokens = _drop_invisible(tokens)
    if "\\over" in tokens:
        tokens = _flatten(_over_to_frac(_parse(tokens)), [])
    return _brace_scripts(tokens)


def normalize(latex: str) -> str:
    """The normalized form: tokens joined by single spaces ('' for an empty formula)."""
    return " ".join(tokenize(latex))


def detokenize(tokens: str | Sequence[str]) -> str:
    r"""Compilable LaTeX from normalized tokens.

    Tokens are joined without spaces, because spaces inside numbers and units (`1 . 5 c m`) or
    text (`\text { o r }`) change what TeX reads; a space is kept only where TeX needs it: after a
    control word followed by a letter, and as the body of a control space."""
    toks = tokens.split() if isinstance(tokens, str) else list(tokens)
    out = []
    for k, t in enumerate(toks):
        out.append(t)
        if t == _CONTROL_SPACE:
            out.append(" ")
        elif (t[0] == "\\" and t[-1].isalpha() and k + 1 < len(toks)
              and toks[k + 1][0].isalpha()):
            out.append(" ")
    return "".join(out)


# Names restored by `restore_backslashes`: commands that a formula writes as a whole word only.
_KNOWN_COMMANDS = frozenset((
    "frac dfrac tfrac sqrt binom times div pm mp cdot cdots ldots dots ast star circ bullet "
    "in notin ni subset subseteq supset supseteq cup cap setminus emptyset varnothing forall "
    "exists neg land lor wedge vee oplus otimes infty partial nabla angle perp parallel "
    "leq geq le ge neq ne approx equiv sim simeq cong propto ll gg "
    "to rightarrow leftarrow Rightarrow Leftarrow leftrightarrow Leftrightarrow mapsto "
    "implies iff uparrow downarrow "
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu "
    "nu xi pi varpi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega "
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh coth log ln lg exp lim "
    "limsup liminf max min sup det arg deg dim gcd hom ker Pr "
    "sum prod int iint iiint oint bigcup bigcap "
    "hat bar vec tilde dot ddot overline underline widehat widetilde overrightarrow "
    "mathrm mathbf mathit mathcal mathbb text operatorname quad qquad prime triangle"
).split())


def restore_backslashes(tokens: str | Sequence[str]) -> list[str]:
    """Put back the backslashes a custom dataset dropped (`frac { 1 } { 3 }`, `sqrt { 2 }`).

    Rule: a token made only of two or more ASCII letters whose name is a known LaTeX command gets a
    backslash. Tokens are whitespace-separated, so a plain letter sequence of a normalized
    formula is already split into letters and is never touched; a word that is not a known
    command (`or`, `inf`) stays as it is, letters and all."""
    toks = tokens.split() if isinstance(tokens, str) else list(tokens)
    return ["\\" + t if len(t) > 1 and t.isascii() and t.isalpha() and t in _KNOWN_COMMANDS
            else t for t in toks]
