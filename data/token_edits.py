"""What changes between two readings of one formula, by kind.

A robustness row's BLEU gap says how much a condition costs, not what: a low-resolution image
may lose marks that its pixels no longer show (an accent's shape, a font switch, a delimiter's
size) or glyphs a model should still read. Aligning the clean image's reading with the
condition's, token by token, and naming each edit by the most telling token it touches answers
that (bench/robustness.py --errors).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rapidfuzz.distance import Indel

from data.spelling import ACCENTS, COMMAND_OF

# Every mark drawn over or under its argument: the references' braced accents and the wide ones
# that spelling.ACCENTS leaves out (a bracing rule, not a list of accents).
ACCENT_MARKS = ACCENTS | frozenset(("\\widehat", "\\widetilde", "\\overrightarrow",
                                    "\\overleftarrow", "\\overbrace", "\\underbrace"))
FONT_SWITCHES = frozenset(COMMAND_OF) | frozenset(COMMAND_OF.values()) | frozenset(
    ("\\mathbb", "\\boldsymbol", "\\mathfrak", "\\mathscr", "\\textbf", "\\textrm", "\\text"))
# Sized delimiters: the size is all that tells `\left(` from `(`, and it is a few pixels.
SIZED = frozenset(("\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\bigl",
                   "\\bigr", "\\Bigl", "\\Bigr", "\\biggl", "\\biggr", "\\Biggl", "\\Biggr"))
SCRIPTS = frozenset(("^", "_"))
BRACES = frozenset(("{", "}"))
# `\left(` is one token (data/normalize.py); `\leftarrow` and `\bigcup` are glyphs.
_CONTROL_WORD = re.compile(r"\\[A-Za-z]+")

# In this order an edit is named by the first kind among its tokens: a dropped `\mathrm {` is a
# font edit even though its brace goes too.
KINDS = ("accent", "font", "sized delimiter", "script", "glyph", "braces")


@dataclass(frozen=True)
class Edit:
    """One difference between reading `a` and reading `b`: a's tokens replaced by b's (either
    side empty for a deletion or an insertion)."""

    a: tuple[str, ...]
    b: tuple[str, ...]

    @property
    def kind(self) -> str:
        return edit_kind(self.a + self.b)


def token_kind(token: str) -> str:
    """The kind of mark a token stands for (KINDS); everything not named is a glyph."""
    if token in ACCENT_MARKS:
        return "accent"
    if token in FONT_SWITCHES:
        return "font"
    word = _CONTROL_WORD.match(token)
    if word and word.group() in SIZED:
        return "sized delimiter"
    if token in SCRIPTS:
        return "script"
    if token in BRACES:
        return "braces"
    return "glyph"


def edit_kind(tokens: Iterable[str]) -> str:
    """The first of KINDS among the tokens."""
    kinds = {token_kind(t) for t in tokens}
    return next(k for k in KINDS if k in kinds)


def token_edits(a: Sequence[str], b: Sequence[str]) -> list[Edit]:
    """The edits that turn token list a into b, between the tokens of a longest common
    subsequence (rapidfuzz's Indel alignment). Not difflib's: its longest-block heuristic lets
    braces, a formula's most frequent tokens, pair across unrelated groups, and a substitution
    cost of one (Levenshtein) lets a run of substitutions hide a shifted match."""
    edits, a_run, b_run = [], [], []
    for op in Indel.opcodes(a, b):
        if op.tag == "equal":
            if a_run or b_run:
                edits.append(Edit(tuple(a_run), tuple(b_run)))
            a_run, b_run = [], []
        else:
            a_run += a[op.src_start:op.src_end]
            b_run += b[op.dest_start:op.dest_end]
    if a_run or b_run:
        edits.append(Edit(tuple(a_run), tuple(b_run)))
    return edits


@dataclass
class EditSummary:
    """Edits over many formula pairs: how many of each kind, how many tokens of the first
    readings they touch, and the edits themselves by frequency."""

    tokens: int = 0  # tokens of the first readings
    by_kind: Counter = field(default_factory=Counter)  # kind -> edits
    # kind -> tokens the edits touch (the longer side of each)
    tokens_by_kind: Counter = field(default_factory=Counter)
    edits: Counter = field(default_factory=Counter)  # Edit -> count

    def add(self, a: Sequence[str], b: Sequence[str]) -> None:
        self.tokens += len(a)
        for e in token_edits(a, b):
            self.by_kind[e.kind] += 1
            self.tokens_by_kind[e.kind] += max(len(e.a), len(e.b))
            self.edits[e] += 1


def summarize(pairs: Iterable[tuple[Sequence[str], Sequence[str]]]) -> EditSummary:
    """The edits from each pair's first reading to its second, over all pairs."""
    s = EditSummary()
    for a, b in pairs:
        s.add(a, b)
    return s
