r"""One spelling for what TeX typesets the same, in training labels: `{ \cal L }` or
`\mathcal { L }`, `f ' ( x )` or `f ^ { \prime } ( x )`.

TeX has two spellings of the same font change. The declaration `\cal` (also `\bf`, `\it`,
`\rm`) applies to the rest of its group; the command `\mathcal { ... }` to its argument. A
prime is `'` or `^ { \prime }` (TeX turns the first into the second), an arrow `\to` or
`\rightarrow`. Each pair typesets the same image, so a reader of the image
cannot know which one a reference used: it can only learn which one its training labels use
more often. When the training formulas and the benchmark's references disagree, every such
symbol costs tokens that no image could have told apart. They do disagree here: IM2LATEX-100K's
references (1990s arXiv, normalized by KaTeX) write `{ \cal L }`, `{ \bf x }`, `\mathrm { d }`
and `f ^ { \prime }`, while the wider corpora the v2 data adds write `\mathcal { L }`,
`\mathbf { x }`, `{ \rm d }` and `f '` (the counts: docs/training.md, "Stage 2 of v2").

`respell` rewrites a normalized formula so that each takes the spelling a `Spelling` says,
without changing what it typesets (tests/test_spelling.py renders both to prove it):

    \mathcal { L } ( x )     ->  { \cal L } ( x )          (command -> declaration)
    { \mathcal { L } }       ->  { \cal L }                (the group is the argument's own)
    { \rm d } x              ->  \mathrm { d } x           (declaration -> command)
    \left( \rm a b \right)   ->  \left( \mathrm { a b } \right)
    f ' ' ^ { 2 } \to 0      ->  f ^ { \prime \prime 2 } \rightarrow 0

A declaration's scope ends where TeX ends it: the end of its group, of its `\left..\right`
pair or environment, or at an alignment cell or row break. Text-mode arguments (`\mbox`,
`\text`, ...) are copied unchanged: `\mathrm` would be an error there, and `'` is an
apostrophe. It is applied to training labels (`train.py --label_spelling`), to both sides of
evaluate.py's "folded" scores, and on request to what inference.py prints (`--spelling`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from data.normalize import _ROW_BREAKS, _TEXT_COMMANDS, _group_end, _is_control_word
from data.vocab import Vocab

__all__ = ["ACCENTS", "COMMAND_OF", "OUTPUT_HELP", "OUTPUT_SPELLINGS", "SPELLINGS", "Spelling",
           "lacking_tokens", "respell"]

# declaration -> the command of the same font
COMMAND_OF = {"\\cal": "\\mathcal", "\\bf": "\\mathbf", "\\it": "\\mathit", "\\rm": "\\mathrm",
              "\\sf": "\\mathsf", "\\tt": "\\mathtt"}
_DECLARATION_OF = {c: d for d, c in COMMAND_OF.items()}
_FONT_SWITCHES = frozenset(COMMAND_OF) | frozenset(_DECLARATION_OF)
# A formula holding these is set partly in text mode outside any text command's argument
# (a tabular's cells, `$..$` inside them): it is left as it is.
_TEXT_MODE = frozenset({"$", "\\begin{tabular}", "\\begin{tabular*}"})


@dataclass(frozen=True)
class Spelling:
    """fonts: declaration -> "declaration" or "command" (fonts not named keep both forms);
    primes: write `x '` as `x ^ { \\prime }`; synonyms: token -> the token written instead."""

    fonts: Mapping[str, str] = field(default_factory=dict)
    primes: bool = False
    synonyms: Mapping[str, str] = field(default_factory=dict)
    braced: frozenset[str] = frozenset()  # macros whose one-symbol argument gets braces

    def touches(self, tokens: set[str]) -> bool:
        """Could `respell` change a formula of these tokens?"""
        return (not _FONT_SWITCHES.isdisjoint(tokens) or (self.primes and "'" in tokens)
                or not tokens.isdisjoint(self.synonyms) or not tokens.isdisjoint(self.braced))


# "references" is the majority spelling of IM2LATEX-100K's validation references (formulas
# holding each, of 8,454): `\cal` 843 vs `\mathcal` 114, `\bf` 277 vs `\mathbf` 54, `\it` 17
# vs `\mathit` 2, `\mathrm` 965 vs `\rm` 0; `\prime` 9.6% vs `'` 0.3%; `\rightarrow` 2.5% vs
# `\to` 1.0%. (`~` is not `\ `: 9.0% vs 0.1%, but its \nobreak changes the space beside a
# relation.) "commands" is today's LaTeX usage for fonts.
SPELLINGS: dict[str, Spelling] = {
    "references": Spelling(fonts={"\\cal": "declaration", "\\bf": "declaration",
                                  "\\it": "declaration", "\\rm": "command"},
                           primes=True, synonyms={"\\to": "\\rightarrow"}),
    "commands": Spelling(fonts={d: "command" for d in COMMAND_OF}),
}
# Accents: the validation references brace every argument of these (4,628 of 4,628), the
# training labels leave 11-28% of each accent's bare (`\hat x`), and TeX reads `\hat x` and
# `\hat { x }` as the same argument. (`\widehat`, `\widetilde`, `\sqrt`, `\frac` are left: the
# references leave 4-30% of theirs bare too.) A new name, so that runs trained on
# "references" resume with the labels they had.
ACCENTS = frozenset("\\" + a for a in (
    "hat bar vec tilde dot ddot check breve acute grave overline underline").split())
SPELLINGS["references_braced"] = replace(SPELLINGS["references"], braced=ACCENTS)
# The --spelling choices of the scripts that print readings (inference.py, serve.py).
OUTPUT_SPELLINGS = ("as_read", *SPELLINGS)
OUTPUT_HELP = ("font switches and primes as the model writes them (as_read), fonts all as "
               "commands (\\mathcal { L }: what KaTeX renders), or as IM2LATEX-100K's "
               "references ({ \\cal L }, f ^ { \\prime }); the same image either way")


def _is_delimiter_word(t: str, word: str) -> bool:
    r"""`\left(` or `\left\langle` (one token, a delimiter glued on), not `\leftarrow`."""
    return t.startswith(word) and len(t) > len(word) and not t[len(word)].isalpha()


def _scope_end(tokens: Sequence[str], i: int) -> int:
    """End (exclusive) of the scope of a declaration whose first affected token is tokens[i]:
    the closing brace, `\\right..` or `\\end{..}` of the unit it is in, or a `\\middle..`,
    cell or row break at its level, whichever comes first."""
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j]
        if t == "{" or _is_delimiter_word(t, "\\left") or t.startswith("\\begin{"):
            depth += 1
        elif t == "}" or _is_delimiter_word(t, "\\right") or t.startswith("\\end{"):
            if depth == 0:
                return j
            depth -= 1
        elif depth == 0 and (t in _ROW_BREAKS or _is_delimiter_word(t, "\\middle")):
            return j
    return len(tokens)


# Macros whose braced arguments TeX typesets as groups (math fields, or wrapped in braces by
# the macro): `\\frac { \\cal A } { 2 }` keeps the font inside. Other macros' braces only
# delimit an argument: `\\ensuremath { \\bf 0 } = 0` would make the `= 0` bold as well.
_GROUPED_ARGUMENTS = frozenset("\\" + c for c in (
    "frac dfrac tfrac cfrac binom dbinom tbinom sqrt stackrel overset underset hat bar vec "
    "tilde dot ddot check breve acute grave widehat widetilde overline underline "
    "overrightarrow overleftarrow overbrace underbrace boxed").split())


def _is_group(before: str) -> bool:
    """Is a `{` after the token `before` a TeX group (so a declaration in it stays inside)?"""
    return not _is_control_word(before) or before in _GROUPED_ARGUMENTS


def _argument(tokens: Sequence[str], j: int) -> tuple[Sequence[str], int]:
    """The TeX argument at tokens[j], a braced group or one token: (its content without the
    braces, the index after it)."""
    if tokens[j] == "{":
        end = _group_end(tokens, j)
        return tokens[j + 1:end - 1], end
    return tokens[j:j + 1], j + 1


def _copy_text_argument(tokens: Sequence[str], i: int, out: list[str]) -> int:
    """Copy a text-mode macro and its braced argument unchanged; return the index after."""
    end = _group_end(tokens, i + 1) if i + 1 < len(tokens) and tokens[i + 1] == "{" else i + 1
    out.extend(tokens[i:end])
    return end


def _to_declaration(tokens: Sequence[str], i: int, out: list[str],
                    spelling: Spelling) -> int:
    r"""`\mathcal { A B }` (at tokens[i]) -> `{ \cal A B }`; `{ \mathcal { A } }`, a group
    holding nothing else, -> `{ \cal A }`. Returns the index after what was rewritten."""
    declaration = _DECLARATION_OF[tokens[i]]
    if i + 1 >= len(tokens) or tokens[i + 1] in _FONT_SWITCHES:  # nothing sound to rewrite
        out.append(tokens[i])
        return i + 1
    inner, end = _argument(tokens, i + 1)
    body = [declaration, *_respell(inner, spelling)]
    if (out and out[-1] == "{" and end < len(tokens) and tokens[end] == "}"
            and _is_group(out[-2] if len(out) >= 2 else "")):
        out.extend([*body, "}"])  # the enclosing group already limits the declaration
        return end + 1
    out.extend(["{", *body, "}"])
    return end


def _free_standing(out: list[str]) -> bool:
    """Is the group just opened (out[-1] == "{") nobody's argument: not a script's, not a
    macro's (any control word might take one), not the second of `\\frac { a } { b }`?"""
    before = out[-2] if len(out) >= 2 else ""
    return before not in ("^", "_", "}", "]") and not _is_control_word(before)


def _to_command(tokens: Sequence[str], i: int, out: list[str],
                spelling: Spelling) -> int:
    r"""`\rm a b` (at tokens[i]) -> `\mathrm { a b }` over the declaration's scope; a
    free-standing group it fills, `{ \rm d }`, becomes `\mathrm { d }` (an argument's,
    `x _ { \rm d }`, keeps its braces). Returns the index after what was rewritten."""
    end = _scope_end(tokens, i + 1)
    body = [COMMAND_OF[tokens[i]], "{", *_respell(tokens[i + 1:end], spelling), "}"]
    if out and out[-1] == "{" and end < len(tokens) and tokens[end] == "}" and _free_standing(out):
        out[-1:] = body  # the command's braces are the group
        return end + 1
    out.extend(body)
    return end


def _to_superscript(tokens: Sequence[str], i: int, out: list[str], spelling: Spelling) -> int:
    r"""`' '` (a run of primes at tokens[i]) -> `^ { \prime \prime }`, taking in a superscript
    right after it as TeX does (`f ' ^ { 2 }` is `f ^ { \prime 2 }`). Returns the index after."""
    j = i
    while j < len(tokens) and tokens[j] == "'":
        j += 1
    primes, rest = ["\\prime"] * (j - i), []
    if j + 1 < len(tokens) and tokens[j] == "^":
        rest, j = _argument(tokens, j + 1)
    out.extend(["^", "{", *primes, *_respell(rest, spelling), "}"])
    return j


# Control words that are one symbol and take no argument, so that `\\hat \\alpha` may become
# `\\hat { \\alpha }`; another control word after an accent (`\\hat \\mathbf { x }`) is left.
_SYMBOL_WORDS = frozenset("\\" + w for w in (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi pi varpi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta "
    "Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega partial nabla ell imath jmath hbar "
    "infty").split())


def _is_symbol(t: str) -> bool:
    """One letter, digit or argument-free symbol word: what an accent may take bare."""
    return (len(t) == 1 and t.isalnum()) or t in _SYMBOL_WORDS


def _respell(tokens: Sequence[str], spelling: Spelling) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _TEXT_COMMANDS:
            i = _copy_text_argument(tokens, i, out)
        elif t in _DECLARATION_OF and spelling.fonts.get(_DECLARATION_OF[t]) == "declaration":
            i = _to_declaration(tokens, i, out, spelling)
        elif t in COMMAND_OF and spelling.fonts.get(t) == "command":
            i = _to_command(tokens, i, out, spelling)
        elif t == "'" and spelling.primes:
            i = _to_superscript(tokens, i, out, spelling)
        elif t in spelling.braced and i + 1 < len(tokens) and _is_symbol(tokens[i + 1]):
            out.extend([t, "{", tokens[i + 1], "}"])  # `\hat x` -> `\hat { x }`
            i += 2
        else:
            out.append(spelling.synonyms.get(t, t))
            i += 1
    return out


def respell(formula: str, spelling: Spelling | str = "references") -> str:
    """`formula` (normalized tokens, space-separated) in the spelling `spelling` (a Spelling
    or a name of SPELLINGS). A formula with nothing to respell comes back unchanged and costs
    a few set intersections."""
    table = SPELLINGS[spelling] if isinstance(spelling, str) else spelling
    tokens = formula.split()
    present = set(tokens)
    if not table.touches(present) or not _TEXT_MODE.isdisjoint(present):
        return formula  # nothing to do, or text mode where math commands would be errors
    return " ".join(_respell(tokens, table))


# Every token a spelling may write where there was none.
_WRITTEN = _FONT_SWITCHES | {"{", "}", "^", "\\prime"} | {
    t for s in SPELLINGS.values() for t in s.synonyms.values()}


def lacking_tokens(formulas: Iterable[str], vocab: Vocab) -> list[str]:
    """The tokens a respelling writes that `formulas` (respelled labels) use and `vocab`
    lacks: a respelling must not turn training targets into <unk>."""
    used = {t for f in formulas if not _WRITTEN.isdisjoint(tokens := f.split()) for t in tokens}
    return sorted(t for t in used & _WRITTEN if t not in vocab.index)
