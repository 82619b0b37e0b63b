"""Cost and look of the training augmentation (data/augment.py) on a preprocessed dataset.

    python bench/augment.py --data_path DIR [--epochs 3] [--grid docs/augment_grid.png]
    python bench/augment.py --data_path DIR --strengths 0.75 --low_res 0.3 --binary 0.2  # a run's

Prints, per level, the time per training image (raw read + augmentation + normalization +
bucket fitting), the share of images changed and the share left clean because normalization or
fitting refused the augmented one; then the time per transform alone. With --grid, writes a
picture of a few training images (left: as stored) and augmented draws of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.augment import LEVELS, Augmenter, with_shares  # noqa: E402
from data.dataset import FormulaDataset  # noqa: E402
from data.files import atomic_open  # noqa: E402
from data.vocab import Vocab  # noqa: E402


def level_cost(ds: FormulaDataset, strength: float, epochs: int, low_res: float,
               binary: float) -> str:
    aug = Augmenter(strength, seed=2020, low_res=low_res, binary=binary)
    changed = 0
    t = time.perf_counter()
    for epoch in range(epochs):
        for i in range(len(ds)):
            img = ds[i][0]
            changed += not np.array_equal(aug(img, epoch, i), img)
    n = epochs * len(ds)
    ms = 1000 * (time.perf_counter() - t) / n
    return (f"strength {strength:g}, low-resolution share {low_res:g}, binary share "
            f"{binary:g}: {ms:.2f} ms/image over "
            f"{n} images, changed {100 * changed / n:.0f}%,"
            f" left clean after a refusal {100 * aug.fallbacks / n:.1f}%")


def transform_cost(ds: FormulaDataset, repeats: int = 20) -> list[str]:
    rng = np.random.default_rng(0)
    sample = [ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 20))]
    out = []
    for name, _, fn in with_shares(1.0, 1.0):  # every transform, the optional ones included
        t = time.perf_counter()
        for _ in range(repeats):
            for img in sample:
                fn(img, rng, 1.0)
        out.append(f"  {name}: {1000 * (time.perf_counter() - t) / (repeats * len(sample)):.2f}"
                   " ms/image at strength 1")
    return out


def grid(ds: FormulaDataset, path: Path, rows: int = 8, draws: int = 4) -> None:
    """Each row: a stored image, then `draws` strong augmentations of it (epochs 0..), on a
    gray frame so that the bucket's extent shows."""
    aug = Augmenter(1.0, seed=7)
    picks = np.linspace(0, len(ds) - 1, rows).round().astype(int)
    tiles = [[ds[int(i)][0]] + [aug(ds[int(i)][0], e, int(i)) for e in range(draws)]
             for i in picks]
    cell_w = max(t.shape[1] for row in tiles for t in row) + 8
    cell_h = [max(t.shape[0] for t in row) + 8 for row in tiles]
    canvas = np.full((sum(cell_h), cell_w * (draws + 1)), 128, np.uint8)
    y = 0
    for row, h in zip(tiles, cell_h):
        for k, t in enumerate(row):
            canvas[y + 4:y + 4 + t.shape[0], k * cell_w + 4:k * cell_w + 4 + t.shape[1]] = t
        y += h
    with atomic_open(path) as f:
        Image.fromarray(canvas).save(f, format="PNG")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="dataset folder with shards/train")
    p.add_argument("--epochs", type=int, default=3, help="draws per image for the timing")
    p.add_argument("--grid", type=Path, help="write a picture of augmented samples here")
    p.add_argument("--strengths", type=float, nargs="+", default=[LEVELS["light"],
                   LEVELS["strong"]], help="augmentation strengths to time")
    p.add_argument("--low_res", type=float, default=0.0,
                   help="share of augmented images also shrunk (train.py --augment_low_res)")
    p.add_argument("--binary", type=float, default=0.0,
                   help="share of augmented images also binarized (train.py --augment_binary)")
    args = p.parse_args()
    shard_dir = Path(args.data_path) / "shards" / "train"
    if not shard_dir.is_dir():
        print(f"error: no {shard_dir}", file=sys.stderr)
        return 1
    ds = FormulaDataset(shard_dir, Vocab.load(Path(args.data_path) / "vocab.json"))
    print(f"{len(ds)} training images of {args.data_path}")
    for strength in args.strengths:
        print(level_cost(ds, strength, args.epochs, args.low_res, args.binary))
    print("\n".join(transform_cost(ds)))
    if args.grid:
        grid(ds, args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
