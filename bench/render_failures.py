"""Why corpus formulas fail to render, by cause, on a seeded sample drawn as the build draws it.

The v1.1 build (docs/training.md) dropped 32% of the sampled corpus as "failed to render"; this
script says why. It reads the corpus files as ``preprocess.py --render`` does (normalize,
dedupe, drop the fixed val/test formulas, a seeded sample, the token filter), renders the
sample strictly in ``cm`` as v1.1 rendered training formulas, and sorts every failure into a
cause: a refusal of the screen (and which rule), a TeX error (and, for an undefined control
sequence, which macro: each control word of a failed formula is looked up with ``\\ifdefined``
under the render preamble in one pdflatex run), a timeout, a blank page...

With ``--recover`` the same sample is also rendered after the build's recovery rewrites
and packages (data/recover.py), as the build now renders training formulas, and both columns
print side by side: the counts before and after, on the same sample.

    python bench/render_failures.py --n 3000 --seed 0 --workers 1 --recover \\
        > docs/results/render_failures.txt
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.build import BuildReport, Filters, normalize_all  # noqa: E402
from data.layout import read_lines  # noqa: E402
from data.normalize import detokenize  # noqa: E402
from data.recover import recover, train_style  # noqa: E402
from data.render import RenderOptions, render_results  # noqa: E402
from data.styles import DEFAULT_STYLE, Style, get_style  # noqa: E402

CORPORA = ("corpora/texnet_arxiv2018.norm.txt", "corpora/dlmf.txt",
           "corpora/arxiv_display_math.txt.gz")
FIXED = ("im2latex100k/val.formulas.norm.txt", "im2latex100k/test.formulas.norm.txt")
_CONTROL_WORD = re.compile(r"\\[a-zA-Z]+")
# TeX's first error line -> a cause; the first pattern that matches names it.
_TEX_CAUSES = (
    ("Undefined control sequence", "undefined control sequence"),
    ("Missing \\$ inserted|Display math should end", "missing $ (math/text mode mix-up)"),
    ("Runaway argument|Paragraph ended before|File ended while", "runaway argument"),
    ("Missing [{}] inserted|Extra \\}|Too many \\}'s|Extra \\\\right|Missing \\\\right",
     "unbalanced group or delimiter"),
    ("Extra alignment tab|Misplaced alignment tab|Misplaced \\\\cr|Misplaced \\\\noalign",
     "alignment (& or \\\\ misplaced)"),
    ("Double (super|sub)script", "double super/subscript"),
    ("Missing delimiter", "missing delimiter"),
    ("Illegal unit|Missing number", "bad number or unit"),
    ("Environment .* undefined", "unknown environment"),
    ("Command .* invalid in math mode|allowed only in math mode", "command in the wrong mode"),
    ("Missing control sequence inserted", "missing control sequence"),
    ("Illegal parameter number|You can't use", "you can't use / illegal"),
    ("LaTeX Error", "other LaTeX error"),
)


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"),
                   help="folder holding corpora/ and im2latex100k/")
    p.add_argument("--n", type=int, default=3000, help="formulas in the sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="TeX processes")
    p.add_argument("--recover", action="store_true",
                   help="also render the sample after data/recover.py's rewrites")
    p.add_argument("--examples", type=int, default=2, help="example formulas per cause")
    p.add_argument("--top", type=int, default=40, help="undefined macros listed")
    return p.parse_args()


def draw_sample(shared: Path, n: int, seed: int, max_tokens: int) -> tuple[list[str], list[str]]:
    """The sample (as build_dataset draws it, in corpus order) and the build-style step lines."""
    report = BuildReport()
    fixed = {f for name in FIXED for f in normalize_all(read_lines(shared / name), BuildReport())}
    lines = [ln for name in CORPORA for ln in read_lines(shared / name)]
    formulas = [f for f in normalize_all(lines, report) if f not in fixed]
    keep = set(random.Random(seed).sample(range(len(formulas)), min(n, len(formulas))))
    sample = [f for i, f in enumerate(formulas) if i in keep]
    short = [f for f in sample if len(f.split()) <= max_tokens]
    steps = [f"corpus lines {len(lines)}, normalized distinct outside val/test "
             f"{len(formulas)}", f"seeded sample {len(sample)} (seed {seed}), "
             f"{len(sample) - len(short)} over {max_tokens} tokens, {len(short)} rendered"]
    return short, steps


def undefined_macros(formulas: list[str], preamble: str) -> set[str]:
    r"""Control words undefined under ``preamble``: one pdflatex run of ``\ifdefined`` tests.
    Safe on corpus text: a name is letters only and ``\ifdefined`` does not expand it."""
    names = sorted({m for f in formulas for m in _CONTROL_WORD.findall(f)})
    tests = "\n".join(f"\\ifdefined{n}\\else\\message{{[UNDEF:{n[1:]}]}}\\fi" for n in names)
    doc = f"{preamble}\\begin{{document}}\n{tests}\n\\end{{document}}\n"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "probe.tex").write_text(doc)
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-no-shell-escape",
                              "probe.tex"], cwd=tmp, capture_output=True, text=True,
                             errors="replace", timeout=300).stdout
    return {"\\" + n for n in re.findall(r"\[UNDEF:([a-zA-Z]+)\]", out.replace("\n", ""))}


def cause(error: str, formula: str, undefined: set[str]) -> tuple[str, list[str]]:
    """(cause, the undefined macros of the formula in order of appearance) of one failure."""
    for prefix, name in (("forbidden in a formula: ", "screen refused"),
                         ("environment not allowed: ", "screen refused environment")):
        if error.startswith(prefix):
            return f"{name}: {error[len(prefix):]}", []
    if error.startswith(("unpaired $", "formula longer", "formula contains")):
        return f"screen refused: {error}", []
    if error.startswith("timed out"):
        return "timed out", []
    for pattern, name in _TEX_CAUSES:
        if re.search(pattern, error):
            if name == "undefined control sequence":
                macros = [m for m in dict.fromkeys(_CONTROL_WORD.findall(formula))
                          if m in undefined]
                return name, macros or ["(none found: defined only inside some group)"]
            return f"TeX: {name}", []
    return f"other: {error[:60]}", []


def classify(formulas: list[str], workers: int,
             style: Style) -> tuple[Counter, Counter, Counter, dict, float]:
    """Render strictly in ``style``: counts per cause, per first undefined macro, per macro
    anywhere in a failed formula, examples per cause and macro, and the seconds it took."""
    opts = RenderOptions(workers=workers, strict=True, bucket=True, style=style)
    start = time.perf_counter()
    results = render_results([detokenize(f) for f in formulas], opts)
    seconds = time.perf_counter() - start
    failed = [(f, r.error or "failed") for f, r in zip(formulas, results) if r.image is None]
    undefined = undefined_macros([f for f, _ in failed], style.preamble())
    causes, first, anywhere, examples = Counter(), Counter(), Counter(), {}
    for f, err in failed:
        c, macros = cause(err, f, undefined)
        causes[c] += 1
        examples.setdefault(c, []).append(f)
        if macros:
            first[macros[0]] += 1
            anywhere.update(macros)
            examples.setdefault(macros[0], []).append(f)
    return causes, first, anywhere, examples, seconds


def print_table(title: str, columns: list[tuple[str, Counter]], total: int, limit: int,
                last: str = "all failures") -> None:
    keys = Counter()
    for _, c in columns:
        keys.update(c)
    print(f"\n{title}" + "".join(f"{name:>12}" for name, _ in columns))
    for k, _ in keys.most_common(limit):
        print(f"  {k[:58]:<58}" + "".join(f"{c[k]:>12}" for _, c in columns))
    print(f"  {last:<58}" + "".join(f"{sum(c.values()):>12}" for _, c in columns)
          + f"   of {total}")


def main() -> int:
    args = get_args()
    sample, steps = draw_sample(Path(args.shared), args.n, args.seed, Filters.max_tokens)
    print("\n".join(steps))
    columns = [("strict", sample, get_style(DEFAULT_STYLE))]
    if args.recover:
        rewritten = [recover(f)[0] for f in sample]
        print(f"recovery rewrote {sum(a != b for a, b in zip(sample, rewritten))} formulas; "
              "'recovered' renders them with the training packages (data/recover.py)")
        columns.append(("recovered", rewritten, train_style(DEFAULT_STYLE)))
    results = [(name, *classify(fs, args.workers, style)) for name, fs, style in columns]
    for name, causes, *_, seconds in results:
        n_fail = sum(causes.values())
        print(f"{name}: {len(sample) - n_fail} of {len(sample)} rendered "
              f"({100 * n_fail / len(sample):.1f}% failed), {seconds:.0f} s with "
              f"{args.workers} TeX worker(s), measured while other jobs ran")
    print_table("cause", [(n, c) for n, c, *_ in results], len(sample), 100)
    print_table("undefined macro, first in a formula", [(n, m) for n, _, m, *_ in results],
                len(sample), args.top)
    print_table("undefined macro, anywhere in a failed formula",
                [(n, a) for n, _, _, a, *_ in results], len(sample), args.top,
                "sum (a formula counts once per macro)")
    name, causes, macros, _, examples, _ = results[0]
    print(f"\nexamples ({name})")
    for k, _ in (causes + macros).most_common(30):
        for f in examples[k][: args.examples]:
            print(f"  {k[:40]:<40} {f[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
