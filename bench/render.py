"""Benchmark the renderer on the real IM2LATEX-100K test formulas (and optionally its fidelity).

    python bench/render.py [--formulas PATH] [--limit N] [--workers N]
    python bench/render.py --sample ../shared/data/im2latex100k_sample --limit 0

The last line is one summary, e.g.
``render: 9443 formulas, 99.7% rendered, 172.3 formulas/s (2 workers)``.
With ``--sample DIR`` the formulas of an IM2LATEX-style directory are rendered with buckets
and compared with its ``formula_images_processed`` (mean absolute pixel difference over the
union of both sizes, white outside, and the share that land in the same bucket).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from data.image import ImageError, read_gray_png  # noqa: E402
from data.render import RenderOptions, render_results  # noqa: E402

DEFAULT_FORMULAS = ROOT / ".." / "shared" / "data" / "im2latex100k" / "test.formulas.norm.txt"


def read_formulas(path: Path, limit: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[:limit] if limit > 0 else lines


def read_sample(root: Path, limit: int) -> list[tuple[Path, str]]:
    """(image path, formula) for every listed image that exists."""
    formulas = (root / "im2latex_formulas.norm.lst").read_text(encoding="utf-8").split("\n")
    pairs = []
    for split in sorted(root.glob("im2latex_*_filter.lst")):
        for line in split.read_text().split("\n"):
            if not line.strip():
                continue
            name, index = line.split()
            image = root / "formula_images_processed" / name
            if image.exists():
                pairs.append((image, formulas[int(index)]))
    return pairs[:limit] if limit > 0 else pairs


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Over the union of both sizes, anchored top-left, white where an image has no pixels."""
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    canvas = np.full((2, h, w), 255, np.float32)
    canvas[0, : a.shape[0], : a.shape[1]] = a
    canvas[1, : b.shape[0], : b.shape[1]] = b
    return float(np.abs(canvas[0] - canvas[1]).mean())


def fidelity(root: Path, limit: int, workers: int) -> str:
    pairs = read_sample(root, limit)
    results = render_results([f for _, f in pairs], RenderOptions(bucket=True, workers=workers))
    diffs, same, failed = [], 0, 0
    for (image, _), result in zip(pairs, results):
        if result.image is None:
            failed += 1
            continue
        try:
            ref = read_gray_png(image)
        except ImageError:
            continue
        diffs.append(mean_abs_diff(ref, result.image))
        same += ref.shape == result.image.shape
    d = np.array(diffs)
    return (f"fidelity: {len(d)} images, mean abs diff {d.mean():.2f} (median "
            f"{np.median(d):.2f}), same bucket {100 * same / max(1, len(d)):.1f}%, "
            f"{failed} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formulas", type=Path, default=DEFAULT_FORMULAS)
    ap.add_argument("--limit", type=int, default=0, help="first N formulas (0: all)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=RenderOptions().batch_size)
    ap.add_argument("--sample", type=Path, help="also measure fidelity against this dataset")
    ap.add_argument("--sample-limit", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    if args.sample is not None:
        print(fidelity(args.sample, args.sample_limit, args.workers), flush=True)
    formulas = read_formulas(args.formulas, args.limit)
    opts = RenderOptions(workers=args.workers, batch_size=args.batch_size)
    start, cpu_start = time.perf_counter(), os.times()
    results = render_results(formulas, opts, progress=not args.no_progress)
    elapsed, cpu_end = time.perf_counter() - start, os.times()
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])  # this process and its TeX/Ghostscript children
    ok = sum(r.image is not None for r in results)
    reasons: dict[str, int] = {}
    for r in results:
        if r.image is None:
            reasons[r.error or "?"] = reasons.get(r.error or "?", 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  failed x{count}: {reason}")
    n = max(1, len(formulas))
    print(f"cpu: {1000 * cpu / n:.1f} ms per formula (all processes; other load slows the "
          f"wall clock, not this), {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    share = math.floor(1000 * ok / n) / 10  # never round 99.98% up to 100.0%
    print(f"render: {len(formulas)} formulas, {share:.1f}% rendered, "
          f"{len(formulas) / elapsed:.1f} formulas/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
