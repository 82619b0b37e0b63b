"""Would reading a resampled image at other enlargements, and keeping the surest reading, help?

Images that normalization resamples (small ones enlarged, hard-edged ones such as 100-dpi
renders) are read at one glyph-scale estimate. This what-if decodes each of them again with
that estimate multiplied by each of --factors (so 0.93 enlarges 7% more), then prints per row:
BLEU-4 at each fixed factor; the oracle (per image, the reading closest to the reference: what
a perfect judge would reach); and the model judging, as im2latex.api judges the ambiguous-scale
second reading: the surest of a set of alternatives replaces the estimate's reading when its
mean log-probability per token is at least a margin higher. Images read without resampling
keep their one reading. Greedy decoding, validation formulas [--start, --start + --n): the
rows of bench/robustness.py use [0, n), so a choice made here is checked on other images there.

    python bench/rereading.py --start 450 --n 300 --threads 1
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.robustness import DATA, STYLE_PREFIX, condition_file, render  # noqa: E402
from data.conditions import CONDITIONS  # noqa: E402
from data.image import (  # noqa: E402  (a what-if on normalization's internals)
    ImageError,
    _normalized,
    _passed_through,
    _read_scale,
    load_image,
    model_input,
)
from data.layout import read_lines  # noqa: E402
from data.metrics import text_scores  # noqa: E402
from data.styles import DEFAULT_STYLE  # noqa: E402
from im2latex.api import Reader  # noqa: E402
from model.checkpoint import DEFAULT_MODEL  # noqa: E402

ROWS = ("low_res", "style:cm-100dpi", "style:cm-aa", "style:times-aa", "blur", "style:cm-10pt")
FACTORS = (0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25)
ALTERNATIVES = ((0.93, 1.07), (0.87, 0.93, 1.07, 1.15), (0.8, 0.87, 0.93, 1.07, 1.15, 1.25))
MARGINS = (0.0, 0.05, 0.1, 0.2)


def get_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--start", type=int, default=450, help="first validation formula")
    p.add_argument("--n", type=int, default=300, help="formulas per row")
    p.add_argument("--conditions", nargs="+", default=list(ROWS), metavar="NAME")
    p.add_argument("--model_path", default=str(DEFAULT_MODEL))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    return p.parse_args()


def readings(data: bytes) -> dict[float, np.ndarray]:
    """factor -> model input; only factor 1 (normalization's own reading) for an image read
    without resampling, or none where normalization refuses the image."""
    try:
        first = _read_scale(load_image(data, "image"))
    except ImageError:
        return {}
    resampled = not _passed_through(first)
    out = {}
    for f in FACTORS if resampled else (1.0,):
        try:
            out[f] = model_input(_normalized(replace(first, scale=first.scale * f)))
        except ImageError:
            continue
    return out


def row_images(name: str, formulas: list[str]) -> list[tuple[str, dict[float, np.ndarray]]]:
    """(reference, readings) of each formula in one robustness row's look, made as
    bench/robustness.py makes it (same seed per row name and position)."""
    style = name[len(STYLE_PREFIX):] if name.startswith(STYLE_PREFIX) else DEFAULT_STYLE
    return [(ref, readings(condition_file(name, img, i, seed=0)))
            for i, (img, ref) in enumerate(zip(render(formulas, style, True), formulas))
            if img is not None]


def judged(preds: dict[float, tuple[str, float]], alternatives: tuple[float, ...],
           margin: float) -> str:
    """The estimate's reading, or the surest alternative where it clears that by margin."""
    base = preds.get(1.0, ("", float("-inf")))
    alt = max((preds[f] for f in alternatives if f in preds), key=lambda p: p[1], default=None)
    return alt[0] if alt is not None and alt[1] >= base[1] + margin else base[0]


def report(name: str, refs: list[str], preds: list[dict[float, tuple[str, float]]]) -> None:
    def bleu(hyps: list[str]) -> str:
        return f"{text_scores(refs, hyps)['bleu4']:6.2f}"

    def closest(p: dict[float, tuple[str, float]], ref: str) -> str:
        sim = lambda h: difflib.SequenceMatcher(None, h.split(), ref.split()).ratio()  # noqa: E731
        return max((h for h, _ in p.values()), key=sim, default="")

    resampled = sum(len(p) > 1 for p in preds)
    print(f"\n{name}: {len(refs)} images, {resampled} resampled")
    print("  fixed factor  " + "  ".join(f"{f:>6}" for f in FACTORS))
    print("  BLEU-4        " + "  ".join(
        bleu([p.get(f, p.get(1.0, ("", 0)))[0] for p in preds]) for f in FACTORS))
    print(f"  oracle over all factors {bleu([closest(p, r) for p, r in zip(preds, refs)])}")
    for alts in ALTERNATIVES:
        cells = []
        for m in MARGINS:
            hyps = [judged(p, alts, m) for p in preds]
            switched = sum(h != p.get(1.0, ("",))[0] for h, p in zip(hyps, preds))
            cells.append(f"m {m:.2f}: {bleu(hyps)} ({switched:3d} changed)")
        print(f"  judged among {','.join(map(str, alts)):<28} " + "  ".join(cells))


def main() -> int:
    args = get_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    formulas = [f.strip() for f in read_lines(DATA / "val.formulas.norm.txt") if f.strip()]
    formulas = formulas[args.start:args.start + args.n]
    reader = Reader(args.model_path, beam_size=1)
    print(f"model {args.model_path}, greedy, validation formulas [{args.start}, "
          f"{args.start + len(formulas)}), factors multiply the glyph-scale estimate")
    for name in args.conditions:
        if name not in CONDITIONS and not name.startswith(STYLE_PREFIX):
            print(f"error: unknown condition {name!r}", file=sys.stderr)
            return 1
        items = row_images(name, formulas)
        flat = [(k, f) for k, (_, r) in enumerate(items) for f in r]
        decoded = reader.decode([items[k][1][f] for k, f in flat])
        preds: list[dict[float, tuple[str, float]]] = [{} for _ in items]
        for (k, f), p in zip(flat, decoded):
            preds[k][f] = (p.latex, p.score)
        report(name, [ref for ref, _ in items], preds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
