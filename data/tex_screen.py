"""The formula text before TeX sees it: the lexical screen, and the rewriting into the body of
a page (``tex_body``, ``wrap_multiline``).

Formulas are untrusted. The screen is defence in depth, not the boundary (that is the sandbox
of data.tex_process): it rejects file and engine primitives (``\\input``, ``\\openin``,
``\\csname``, ``\\string``, ``\\IfFileExists``, ``\\pdf...``, ``^^`` escapes, ...),
ways to take a command apart from its argument (``\\let``, ``\\expandafter``,
``\\aftergroup``, ``#``), environments outside an allow-list (``\\begin{input}`` runs
``\\input``) and over-long formulas; raw ``~`` and ``$`` are rewritten (``\\nobreakspace{}``,
``\\(..\\)``), so no formula spells the catcode-12 ``~`` or ``$`` of kpathsea's ``~user/``
and ``$VAR/``. Formulas with global assignments are told apart (``needs_isolation``): they
get a TeX run of their own.

Multi-line bodies: a formula with ``\\\\`` or ``&`` outside any group or environment (an
align or eqnarray body) is wrapped in ``aligned`` (if it has ``&``) or ``gathered``; IM2LATEX
formulas never have them at top level (their rows live in ``array``), so they are unaffected.
"""

from __future__ import annotations

import re

# Anything that touches files, the engine or the tokenizer, spells a name or a file name
# from tokens (``\\string~`` makes the catcode-12 ``~`` that kpathsea expands to a home
# directory; ``\\pagenumbering{@@input}`` makes ``\\thepage`` run ``\\@@input``), copies
# or moves a token away from what follows it (``\\let\\b\\begin``, then ``\\b{input}``),
# or sets hooks; no formula needs these.
_FORBIDDEN = re.compile(
    r"\\(input|include|includeonly|openin|openout|closein|closeout|read|readline|write|"
    r"immediate|csname|ifcsname|catcode|lccode|uccode|sfcode|mathcode|delcode|scantokens|"
    r"endinput|jobname|shipout|output|everyjob|everyeof|primitive|pdf[a-z]*|directlua|"
    r"latelua|usepackage|RequirePackage|documentclass|LoadClass|dump|batchmode|nonstopmode|"
    r"scrollmode|errorstopmode|interactionmode|string|detokenize|unexpanded|meaning|"
    r"fontname|font|newfont|fontencoding|fontfamily|usefont|Declare[A-Za-z]*|"
    r"makeatletter|ExplSyntaxOn|UseName|ExpandArgs|[A-Za-z]*CommandCopy|IfFileExists|"
    r"InputIfFileExists|listfiles|nofiles|verbatiminput|lstinputlisting|special|let|"
    r"futurelet|expandafter|aftergroup|afterassignment|AddToHook[A-Za-z]*|UseHook|"
    r"AtBeginDocument|AtEndDocument|AtBeginDvi|tableofcontents|listof[a-z]*|"
    r"addtocontents|addcontentsline|newwrite|newread|bibliography[a-z]*|pagenumbering|"
    r"pagestyle|thispagestyle|numberwithin|newtheorem)(?![a-zA-Z])"
    r"|\\@(?=[a-zA-Z])|\^\^"
)
# Environments that formulas use and the preamble's packages define. LaTeX runs ``\\NAME``
# for ``\\begin{NAME}`` and ``\\endNAME`` for ``\\end{NAME}``: any other name could run a
# primitive the screen refuses by name (``\\begin{input}``, ``\\end{csname}``).
ENVIRONMENTS = frozenset({
    "array", "tabular", "matrix", "pmatrix", "bmatrix", "Bmatrix", "vmatrix", "Vmatrix",
    "smallmatrix", "cases", "aligned", "alignedat", "gathered", "split", "subarray", "picture",
})
_ENVIRONMENT = re.compile(r"\\(?:begin|end)(?![a-zA-Z])(?:\s*\{([a-zA-Z]+)\})?")
# One TeX token as the default catcodes read it (a comment runs to the end of its line).
_TOKEN = re.compile(r"\\(?:[a-zA-Z]+|.)|%[^\n]*|.", re.S)
# Global assignments would leak into later formulas of a batch: render those alone.
_GLOBAL = re.compile(
    r"\\(global|gdef|xdef|globaldefs|setcounter|addtocounter|stepcounter|refstepcounter|"
    r"newcounter|aftergroup|afterassignment|fontdimen|hyphenchar|skewchar|deadcycles|"
    r"insertpenalties|prevgraf|interactionmode)(?![a-zA-Z])"
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def screen(formula: str, max_chars: int = 4096) -> str | None:
    """Why a formula must not reach TeX, or None; cheap and conservative."""
    if not formula.strip():
        return "empty formula"
    if len(formula) > max_chars:
        return f"formula longer than {max_chars} characters"
    if _CONTROL_CHARS.search(formula):
        return "formula contains control characters"
    m = _FORBIDDEN.search(formula)
    if m:
        return f"forbidden in a formula: {m.group(0)}"
    for m in _ENVIRONMENT.finditer(formula):
        if m.group(1) not in ENVIRONMENTS:
            return f"environment not allowed: {m.group(0)}"
    return _screen_characters(formula)


def _screen_characters(formula: str) -> str | None:
    """Raw ``#`` (a macro parameter: lets a macro take ``\\begin`` apart from its name) and
    ``$`` that cannot become ``\\(...\\)`` pairs."""
    dollars, previous = 0, ""
    for token in _TOKEN.findall(formula):
        if token == "#":
            return "forbidden in a formula: # (macro parameter)"
        if token == "$":
            if previous == "$":
                return "forbidden in a formula: $$"
            dollars += 1
        previous = token
    return "unpaired $ in a formula" if dollars % 2 else None


def tex_body(formula: str) -> str:
    """The formula as it goes into the document: no raw ``~`` or ``$`` reach TeX.

    ``~`` is ``\\nobreakspace{}`` in LaTeX and ``$..$`` pairs are ``\\(..\\)`` (the same
    image), so no character of the formula can become the catcode-12 ``~`` or ``$`` with which
    kpathsea expands ``~user/`` and ``$VAR/`` in a file name. Call after ``screen``.
    """
    out, dollars = [], 0
    for token in _TOKEN.findall(formula):
        if token == "~":
            token = "\\nobreakspace{}"
        elif token == "$":
            token = "\\(" if dollars % 2 == 0 else "\\)"
            dollars += 1
        out.append(token)
    return "".join(out)


def needs_isolation(formula: str) -> bool:
    """Global assignments survive the page; such a formula gets a TeX run of its own."""
    return _GLOBAL.search(formula) is not None


def _top_level_marks(formula: str) -> set[str]:
    """Which of ``\\\\`` and ``&`` occur outside braces and environments."""
    found: set[str] = set()
    depth = 0
    i = 0
    while i < len(formula):
        c = formula[i]
        if c == "\\":
            m = re.match(r"\\([a-zA-Z]+|.)", formula[i:], re.S)
            name = m.group(1) if m else ""
            if name == "begin":
                depth += 1
            elif name == "end":
                depth -= 1
            elif name == "\\" and depth == 0:
                found.add("\\\\")
            i += len(m.group(0)) if m else 1
            continue
        if c == "%":  # a comment runs to the end of the line
            nl = formula.find("\n", i)
            i = len(formula) if nl < 0 else nl
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "&" and depth == 0:
            found.add("&")
        i += 1
    return found


def wrap_multiline(formula: str) -> str:
    """Give an align/eqnarray body the alignment it needs; leave every other formula as is."""
    marks = _top_level_marks(formula)
    if not marks:
        return formula
    env = "aligned" if "&" in marks else "gathered"
    return f"\\begin{{{env}}}\n{formula}\n\\end{{{env}}}"
