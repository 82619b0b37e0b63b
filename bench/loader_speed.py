"""How fast the data path delivers training batches, for each number of loader workers.

    python bench/loader_speed.py --data_path ref_data [--workers 0 1 2 4] [--batches 300]
    python bench/loader_speed.py     # synthetic shards shaped like IM2LATEX-100K's train split

A step waits for data only if the DataLoader delivers fewer images per second than the step
consumes, so this times the loader alone: memory-mapped shards read, formulas tokenized, batches
collated (and pinned where CUDA is available), through the same sampler and collate function
as train.py.  Compare its img/s with bench/train_speed.py's on the same machine; train.py also
logs the share of time it actually waited (log.csv `data_wait`, and the line printed on stop).

It also prints the size of the dataset as pickled for a worker started by spawn or forkserver
(`--start_method`; the default on macOS and Windows): the shards travel as paths and each
worker maps them again, rather than receiving a copy of every image.
"""

import argparse
import multiprocessing as mp
import pickle
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/loader_speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from bench.memory import write_synthetic
from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.shards import load_split
from data.vocab import Vocab


def images_per_second(ds: FormulaDataset, batch: int, workers: int, batches: int,
                      start_method: str | None = None) -> float:
    """Images/s over `batches` batches, after the workers have started and delivered a few."""
    sampler = BucketBatchSampler(ds.bucket_items, batch, seed=0, lengths=ds.lengths)
    order = sampler.batches(0)
    warmup = min(10, len(order) // 4)
    loader = DataLoader(ds, batch_sampler=order[: warmup + batches], collate_fn=collate,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator(),
                        multiprocessing_context=start_method if workers else None)  # fmt: skip
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    for b in it:
        n += len(b["imgs"])
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", type=Path, help="a preprocessed dataset (default: synthetic)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=300, help="timed batches per worker count")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--synthetic", type=int, default=20000, help="images, without --data_path")
    p.add_argument("--start_method", choices=["fork", "spawn", "forkserver"],
                   help="how workers start (default: the platform's; spawn on macOS/Windows)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="loader_speed_") as tmp:
        if args.data_path:
            shard_dir = args.data_path / "shards" / args.split
            vocab = Vocab.load(args.data_path / "vocab.json")
        else:
            shard_dir = Path(tmp)
            write_synthetic(shard_dir, args.synthetic)
            vocab = Vocab.build(f for b in load_split(shard_dir) for f in b.formulas)
        ds = FormulaDataset(shard_dir, vocab)
        print(f"loader_speed: {len(ds)} images from {args.data_path or 'synthetic shards'}, "
              f"batch {args.batch}, {args.batches} batches per setting, workers started by "
              f"{args.start_method or mp.get_start_method()}")  # fmt: skip
        # what a spawn / forkserver worker receives: the shards' paths, not their images
        mapped = sum(b.images.nbytes for b in ds.buckets)
        print(f"  dataset pickled for a worker: {len(pickle.dumps(ds)) / 2**20:.1f} MiB "
              f"(its images, memory-mapped: {mapped / 2**20:.0f} MiB)")
        rates = {}
        for w in args.workers:
            rates[w] = images_per_second(ds, args.batch, w, args.batches, args.start_method)
            print(f"  workers {w}: {rates[w]:8.0f} img/s", flush=True)
    print("loader_speed: " + ", ".join(f"workers {w} {r:.0f} img/s" for w, r in rates.items()))


if __name__ == "__main__":
    main()
