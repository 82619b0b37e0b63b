"""Resident memory of a loaded 77K-image training set, ours versus a pickled float32 set.

    python bench/memory.py [--n 77000] [--dir /tmp/im2latex_mem] [--batches 300]

Writes synthetic shards shaped like IM2LATEX-100K's training split (same image count, the
real bucket sizes in realistic proportions), then, in a fresh process, loads them through
`FormulaDataset` and a 2-worker DataLoader, draws `--batches` batches, and reads the process
tree's memory from /proc. Anonymous (private) memory is the real cost; file-backed pages are
the shards' page cache, shared between workers and reclaimable. luopeixiang/im2latex keeps
every image as a 3-channel float32 tensor in RAM; its figure is computed from the same image
sizes (materializing 12 GB here would prove nothing but the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (height, width) after downsampling and the share of IM2LATEX-100K training images in it,
# roughly as in the original train split (most formulas are one line, 40-60 px high).
SIZES = [((40, 160), 0.08), ((40, 200), 0.12), ((40, 240), 0.11), ((40, 280), 0.09),
         ((40, 320), 0.07), ((40, 360), 0.05), ((50, 120), 0.05), ((50, 200), 0.07),
         ((50, 240), 0.07), ((50, 280), 0.06), ((50, 320), 0.05), ((50, 360), 0.04),
         ((50, 400), 0.04), ((60, 360), 0.03), ((100, 360), 0.03), ((100, 500), 0.03),
         ((160, 400), 0.01)]


def write_synthetic(out: Path, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Shards in the real format with `n` images of text-like content (sparse dark strokes)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shares = np.array([s for _, s in SIZES])
    counts = np.floor(shares / shares.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    buckets, sizes = [], []
    for ((h, w), _), c in zip(SIZES, counts):
        fname = f"{h}x{w}.npy"
        arr = np.lib.format.open_memmap(out / fname, mode="w+", dtype=np.uint8, shape=(c, h, w))
        stroke = np.where(rng.random((64, h, w)) < 0.08, 0, 255).astype(np.uint8)
        for i in range(0, c, 64):
            arr[i:i + 64] = stroke[: min(64, c - i)]
        arr.flush()
        del arr
        formula = " ".join(["x", "^", "{", "2", "}", "+"] * 8)
        buckets.append({"file": fname, "height": h, "width": w,
                        "names": [f"{h}x{w}_{i}.png" for i in range(c)],
                        "formulas": [formula] * int(c)})
        sizes += [(h, w)] * int(c)
    (out / "index.json").write_text(json.dumps({"version": 1, "split": "train",
                                                "buckets": buckets}))
    return sizes


def tree_memory(pid: int) -> dict[str, int]:
    """RssAnon / RssFile of a process and its children, in bytes."""
    total = {"RssAnon": 0, "RssFile": 0}
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def measure(shard_dir: Path, batches: int) -> None:
    """Runs in a child process: load the split, draw batches with 2 workers, print memory."""
    import torch
    from torch.utils.data import DataLoader

    from data.dataset import BucketBatchSampler, FormulaDataset, collate
    from data.vocab import Vocab

    torch.set_num_threads(1)
    vocab = Vocab.build(["x ^ { 2 } +"])
    ds = FormulaDataset(shard_dir, vocab, max_len=150)
    loaded = tree_memory(os.getpid())
    sampler = BucketBatchSampler(ds.bucket_items, 32, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler.batches(0)[:batches], collate_fn=collate,
                        num_workers=2, generator=torch.Generator())
    peak = dict(loaded)
    for k, _ in enumerate(loader):
        if k % 20 == 0:
            m = tree_memory(os.getpid())
            peak = {key: max(peak[key], m[key]) for key in peak}
    print(json.dumps({"images": len(ds), "loaded": loaded, "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=77_000)
    p.add_argument("--dir", default="/tmp/im2latex_memory_bench")
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(Path(args.measure), args.batches)

    shard_dir = Path(args.dir) / "train"
    sizes = write_synthetic(shard_dir, args.n)
    disk = sum(f.stat().st_size for f in shard_dir.iterdir())
    out = subprocess.run([sys.executable, __file__, "--measure", str(shard_dir),
                          "--batches", str(args.batches)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pickled = sum(3 * 4 * h * w for h, w in sizes)
    gib = 1024 ** 3
    print(f"images: {r['images']}, shards on disk: {disk / gib:.2f} GiB")
    print(f"after loading: anon {r['loaded']['RssAnon'] / gib:.3f} GiB, "
          f"file-backed {r['loaded']['RssFile'] / gib:.3f} GiB")
    print(f"peak over {args.batches} batches (main + 2 workers): anon "
          f"{r['peak']['RssAnon'] / gib:.3f} GiB, file-backed {r['peak']['RssFile'] / gib:.3f} GiB")
    ours = r["peak"]["RssAnon"] + r["peak"]["RssFile"]
    print(f"memory: ours {ours / gib:.2f} GiB resident (peak, all processes), "
          f"float32 3-channel pickle {pickled / gib:.1f} GiB, {pickled / ours:.0f}x less")


if __name__ == "__main__":
    main()
