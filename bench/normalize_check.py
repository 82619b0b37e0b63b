"""Does normalizing keep formulas intact? Two checks of data/normalize.py on the reference data.

1. Idempotence: on already normalized lists (IM2LATEX-100K val/test, the TeXNet corpus),
   `normalize(line) == line` should hold for >= 99% of lines.
2. Render equivalence: for raw formulas (arXiv display math, DLMF), the normalized form should
   render to the very same image as the raw formula for >= 95% of those whose raw form renders.

    python bench/normalize_check.py                     # both checks, 500 raw formulas a corpus
    python bench/normalize_check.py --sample 2000 --show 5
    python bench/normalize_check.py --no_render         # idempotence only (no TeX needed)
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.normalize import (  # noqa: E402
    NormalizeError,
    detokenize,
    normalize,
    strip_math_wrappers,
)

NORMALIZED_FILES = ("im2latex100k/val.formulas.norm.txt", "im2latex100k/test.formulas.norm.txt",
                    "corpora/texnet_arxiv2018.norm.txt")
RAW_FILES = ("corpora/arxiv_display_math.txt.gz", "corpora/dlmf.txt")


def read_lines(path: Path) -> list[str]:
    """Non-empty lines; the reference .norm.txt files have CRLF line ends."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [ln.rstrip("\r\n") for ln in f if ln.strip()]


def idempotence(lines: list[str]) -> tuple[int, Counter, list[tuple[str, str]]]:
    """How many lines normalize to themselves, why the others did not, and examples."""
    same, why, examples = 0, Counter(), []
    for line in lines:
        try:
            out = normalize(line)
        except NormalizeError as e:
            why[f"error: {e}"] += 1
            continue
        if out == line.strip():
            same += 1
        else:
            why["changed"] += 1
            examples.append((line, out))
    return same, why, examples


def same_image(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool((a == b).all())


def render_equivalence(raw: list[str], show: int) -> dict[str, int]:
    """Render each raw formula and its normalized form; count identical images.

    The raw formula and the detokenized normalized one (the compilable LaTeX it stands for)
    render strictly: a formula with any TeX error does not count as rendering, since TeX's
    error recovery (an undefined `\\bR` dropped, say) makes images no formula stands for. The
    normalized string itself also renders as is (leniently, like the original dataset, where
    `\\hspace { 1 c m }` gives "pt inserted"): that is what a dataset builder gets when it
    renders normalized lines directly, and spaces then matter in text mode and dimensions.
    The raw formula goes to the renderer without its `$..$` (DLMF) or `\\[..\\]` wrapper,
    since the renderer sets every formula in display math itself."""
    from data.render import RenderOptions, render_formulas

    strict = RenderOptions(strict=True)

    normalized: list[str | None] = []
    for f in raw:
        try:
            normalized.append(normalize(f) or None)
        except NormalizeError:
            normalized.append(None)
    todo = [i for i, n in enumerate(normalized) if n is not None]
    raw_images = render_formulas([strip_math_wrappers(f) for f in raw], strict)
    rendered = [i for i, img in enumerate(raw_images) if img is not None]
    counts = {"sampled": len(raw), "normalize failed": len(raw) - len(todo),
              "raw rendered": len(rendered)}
    for kind, form, opts in (("detokenized", detokenize, strict),
                             ("as is", str, RenderOptions())):
        images: list[np.ndarray | None] = [None] * len(raw)
        for i, img in zip(todo, render_formulas([form(normalized[i]) for i in todo], opts)):
            images[i] = img
        differ = [i for i in rendered if not same_image(raw_images[i], images[i])]
        counts[f"identical, {kind}"] = len(rendered) - len(differ)
        for i in differ[:show]:
            state = ("normalize failed" if normalized[i] is None else "did not render"
                     if images[i] is None else "renders differently")
            print(f"    {kind}: {state}:\n      raw:  {raw[i][:200]}\n"
                  f"      norm: {str(normalized[i])[:200]}")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="reference data folder")
    p.add_argument("--sample", type=int, default=500, help="raw formulas per corpus to render")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=3, help="examples of failures to print")
    p.add_argument("--no_render", action="store_true", help="skip the render check")
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"error: reference data folder {args.data} not found")

    print("idempotence: normalize(line) == line")
    for name in NORMALIZED_FILES:
        lines = read_lines(args.data / name)
        t = time.time()
        same, why, examples = idempotence(lines)
        print(f"  {name:<40} {same:>6}/{len(lines):<6} {100 * same / len(lines):6.2f}%"
              f"   ({time.time() - t:.1f}s; {dict(why)})")
        for line, out in examples[:args.show]:
            print(f"    in:  {line[:150]}\n    out: {out[:150]}")

    if args.no_render:
        return
    print(f"render equivalence: raw vs normalized image, {args.sample} sampled a corpus")
    for name in RAW_FILES:
        lines = read_lines(args.data / name)
        sample = random.Random(args.seed).sample(lines, min(args.sample, len(lines)))
        t = time.time()
        r = render_equivalence(sample, args.show)
        n = max(r["raw rendered"], 1)
        print(f"  {name:<40} of {r['raw rendered']} whose raw form renders "
              f"({r['sampled']} sampled, {r['normalize failed']} not normalizable; "
              f"{time.time() - t:.0f}s):\n"
              f"    identical, detokenized: {r['identical, detokenized']:>5} "
              f"= {100 * r['identical, detokenized'] / n:5.1f}%\n"
              f"    identical, as is:       {r['identical, as is']:>5} "
              f"= {100 * r['identical, as is'] / n:5.1f}%")


if __name__ == "__main__":
    main()
