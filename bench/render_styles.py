"""Speed and failures of every render style (data/styles.py) on real validation formulas.

    python bench/render_styles.py [--formulas PATH] [--limit 200] [--workers 1]

Per style: formulas/s, how many fail in strict mode (how training formulas render: any TeX
error fails) and in lenient mode (how test formulas render), the commonest strict failure,
how many images exceed the training size filter (500x160), and how many glyphs the style's
fonts lack (pdfTeX's "Missing character" with \\tracinglostchars: TeX drops such a glyph
without an error, so strict mode would keep an image that lacks part of its label).
Validation formulas, never test ones: this decides which styles are worth training on.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from data import render as R  # noqa: E402
from data.build import Filters  # noqa: E402
from data.layout import read_lines  # noqa: E402
from data.normalize import detokenize  # noqa: E402
from data.render import RenderOptions, render_results  # noqa: E402
from data.sandbox import sandboxed  # noqa: E402
from data.styles import STYLES, get_style, parse_styles  # noqa: E402
from data.tex_document import Geometry, make_document  # noqa: E402

DEFAULT_FORMULAS = ROOT / ".." / "shared" / "data" / "im2latex100k" / "val.formulas.norm.txt"


def lost_glyphs(formulas: list[str], style: str) -> int:
    """Glyphs the style's fonts lack, over all formulas: one draft-mode pdflatex run (in the
    sandbox) of the renderer's own document with \\tracinglostchars on."""
    fs = [f for f in formulas if R.screen(f) is None and not R.needs_isolation(f)]
    doc = make_document(fs, "bench", Geometry(), 200, get_style(style))
    doc = doc.replace("\\begin{document}", "\\tracinglostchars=1\n\\begin{document}", 1)
    with tempfile.TemporaryDirectory(prefix="im2latex-lost-") as tmp:
        (Path(tmp) / "lost.tex").write_text(doc)
        argv = ["pdflatex", "-no-shell-escape", "-interaction=nonstopmode", "-draftmode",
                "lost.tex"]
        subprocess.run(sandboxed(argv, Path(tmp)), cwd=tmp, capture_output=True, timeout=600)
        log = (Path(tmp) / "lost.log").read_text(encoding="latin-1")
    return len(re.findall(r"Missing character: There is no", log))


def measure(formulas: list[str], style: str, workers: int) -> str:
    """One table row: speed and failures of one style."""
    opts = RenderOptions(workers=workers, bucket=True, style=style)
    start = time.perf_counter()
    strict = render_results(formulas, replace(opts, strict=True))
    seconds = time.perf_counter() - start
    lenient = render_results(formulas, opts)
    failed = [r.error or "?" for r in strict if r.image is None]
    top = Counter(e.splitlines()[0][:48] for e in failed).most_common(1)
    limit = Filters()
    big = sum(r.image is not None and (r.image.shape[1] > limit.max_width
                                       or r.image.shape[0] > limit.max_height) for r in strict)
    lost = lost_glyphs(formulas, style)
    return (f"{style:<10} {len(formulas) / seconds:8.1f} {len(failed):7d} "
            f"{sum(r.image is None for r in lenient):8d} {big:5d} {lost:6d}   "
            f"{top[0][0] + f' ({top[0][1]})' if top else '-'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formulas", type=Path, default=DEFAULT_FORMULAS)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--styles", default=",".join(STYLES))
    args = ap.parse_args(argv)
    if not args.formulas.is_file():
        print(f"error: formula file {args.formulas} not found", file=sys.stderr)
        return 1
    try:
        styles = parse_styles(args.styles)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    formulas = [detokenize(f) for f in read_lines(args.formulas)[: args.limit] if f.strip()]
    print(f"# {len(formulas)} formulas of {args.formulas.name}, {args.workers} worker(s)")
    print("style      formulas/s  strict  lenient  >500x160  lost   commonest strict failure")
    for style in styles:
        print(measure(formulas, style, args.workers), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
