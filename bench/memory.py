"""Resident memory of a loaded 77K-image training set, ours versus a pickled float32 set.

    python bench/memory.py [--n 77000] [--dir /tmp/im2latex_mem] [--batches 300]

Writes synthetic shards shaped like IM2LATEX-100K's training split (same image count, the
real bucket sizes in realistic proportions), then, in a fresh process, loads them through
`FormulaDataset` and a 2-worker DataLoader, draws `--batches` batches, and reads the process
tree's proportional memory from /proc above the baseline of a process that has imported
torch. Anonymous memory is the real cost; the shards' resident pages are page cache, shared
between workers and reclaimable (the kernel's fault-around maps cached neighbours of each page
read, so this overstates what a batch touches). luopeixiang/im2latex keeps every image as a
3-channel float32 tensor in RAM; its figure is computed from the same image sizes
(materializing 12 GB here would prove nothing but the arithmetic).
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
        c = int(c)
        arr = np.lib.format.open_memmap(out / fname, mode="w+", dtype=np.uint8, shape=(c, h, w))
        stroke = np.where(rng.random((64, h, w)) < 0.08, 0, 255).astype(np.uint8)
        for i in range(0, c, 64):
            arr[i:i + 64] = stroke[: min(64, c - i)]
        arr.flush()
        del arr
        formula = " ".join(["x", "^", "{", "2", "}", "+"] * 8)
        buckets.append({"file": fname, "height": h, "width": w,
                        "names": [f"{h}x{w}_{i}.png" for i in range(c)],
                        "formulas": [formula] * c})
        sizes += [(h, w)] * c
    (out / "index.json").write_text(json.dumps({"version": 1, "split": "train",
                                                "buckets": buckets}))
    return sizes


def tree_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid] + ([int(p) for p in children.read_text().split()] if children.exists() else [])


def tree_memory(pid: int) -> dict[str, int]:
    """Proportional set size of a process and its children, in bytes: anonymous memory, and
    the resident pages of the shard files. PSS splits a page shared by N processes N ways, so
    forked DataLoader workers are not counted N times for the same page."""
    total = {"anon": 0, "shards": 0}
    for p in tree_pids(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
            total["anon"] += sum(int(ln.split()[1]) * 1024 for ln in rollup
                                 if ln.startswith("Pss_Anon:"))
            in_shard = False
            for ln in Path(f"/proc/{p}/smaps").read_text().splitlines():
                head = ln.split()
                if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
                    in_shard = ln.rstrip().endswith(".npy")
                elif in_shard and ln.startswith("Pss:"):
                    total["shards"] += int(head[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def measure(shard_dir: Path, batches: int) -> None:
    """Runs in a child process: load the split, draw batches with 2 workers, print memory
    above the baseline of an interpreter that has imported torch and the project."""
    import torch
    from torch.utils.data import DataLoader

    from data.dataset import MAX_TRAIN_TOKENS, BucketBatchSampler, FormulaDataset, collate
    from data.vocab import Vocab

    torch.set_num_threads(1)
    base = tree_memory(os.getpid())
    vocab = Vocab.build(["x ^ { 2 } +"])
    ds = FormulaDataset(shard_dir, vocab, max_len=MAX_TRAIN_TOKENS)
    loaded = tree_memory(os.getpid())
    sampler = BucketBatchSampler(ds.bucket_items, 32, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler.batches(0)[:batches], collate_fn=collate,
                        num_workers=2, generator=torch.Generator())
    peak = dict(loaded)
    for k, _ in enumerate(loader):
        if k % 20 == 0:
            m = tree_memory(os.getpid())
            peak = {key: max(peak[key], m[key]) for key in peak}
    print(json.dumps({"images": len(ds), "base": base, "loaded": loaded, "peak": peak}))


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
    gib, mib = 1024 ** 3, 1024 ** 2
    base, loaded, peak = r["base"], r["loaded"], r["peak"]
    print(f"images: {r['images']}, shards on disk: {disk / gib:.2f} GiB")
    print(f"loading the split: +{(loaded['anon'] - base['anon']) / mib:.0f} MiB anonymous")
    print(f"peak over {args.batches} batches of 32 (main + 2 workers): "
          f"+{(peak['anon'] - base['anon']) / mib:.0f} MiB anonymous over the baseline, "
          f"{peak['shards'] / mib:.0f} MiB of shard pages resident (page cache, shared)")
    ours = peak["anon"] - base["anon"] + peak["shards"]
    print(f"memory: ours {ours / mib:.0f} MiB for {r['images']} images, float32 3-channel "
          f"tensors {pickled / gib:.1f} GiB, {pickled / ours:.0f}x less")

if __name__ == "__main__":
    main()
