"""Compact training shards: one uint8 `.npy` per image size, memory-mapped when read.

luopeixiang/im2latex pickled float32 3-channel tensors (~12 GB for the 77K training images).
A grayscale byte per pixel is all the renders hold, and memory-mapping keeps a loaded split at
the size of the pages actually touched, so a DataLoader's workers share one copy via the page
cache instead of each unpickling the whole set.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.files import atomic_open, atomic_write, remove_stale_temps
from data.image import ImageError, pad_to_bucket, read_gray_png
from data.layout import FORMULAS_FILE, SPLITS, Entry, read_lines, read_split, split_file

INDEX = "index.json"
MAX_PROBLEMS_SHOWN = 20
FORMAT_VERSION = 1


class ShardError(ValueError):
    """Shards that are missing or inconsistent; the message says which file and what to run."""


@dataclass
class ShardReport:
    written: int = 0
    problems: list[str] = field(default_factory=list)


def write_split(entries: Sequence[Entry], out_dir: str | Path, split: str,
                progress: bool = True) -> ShardReport:
    """Group a split's images by size (after bucket padding) and write one array per size.

    One pass decodes each image once and appends its bytes to a raw file for its size (the
    count per size is not known until the end, and an `.npy` header needs it); each raw file is
    then copied into an `.npy` from a memory map. Peak memory is one image, not the split.
    The half-written arrays of a killed run are removed first (data.files temporary names)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    report = ShardReport()
    by_size: dict[tuple[int, int], list[Entry]] = defaultdict(list)
    buckets = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".raw-") as raw_dir:
        raw_files = {}
        try:
            for e in tqdm(entries, desc=f"{split}: read", disable=not progress, unit="img"):
                try:
                    img = pad_to_bucket(read_gray_png(e.image))
                except ImageError as err:
                    report.problems.append(f"{e.source}: {err}")
                    continue
                if img.shape not in raw_files:
                    h, w = img.shape
                    raw_files[img.shape] = open(Path(raw_dir) / f"{h}x{w}.raw", "wb")
                raw_files[img.shape].write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
                by_size[img.shape].append(e)
        finally:
            for f in raw_files.values():
                f.close()
        for (h, w), group in sorted(by_size.items()):
            fname = f"{h}x{w}.npy"
            raw = np.memmap(Path(raw_dir) / f"{h}x{w}.raw", dtype=np.uint8, mode="r",
                            shape=(len(group), h, w))
            with atomic_open(out_dir / fname) as f:
                np.save(f, raw)  # streamed from the memory map, never all in memory
            del raw
            buckets.append({"file": fname, "height": h, "width": w,
                            "names": [e.image.name for e in group],
                            "formulas": [e.formula for e in group]})
            report.written += len(group)
    index = {"version": FORMAT_VERSION, "split": split, "buckets": buckets}
    atomic_write(out_dir / INDEX, json.dumps(index, ensure_ascii=False) + "\n")
    return report


def shard_dataset(data_dir: str | Path, progress: bool = True) -> int:
    """Shard every split file of a standard-layout dataset into DIR/shards/SPLIT.

    Bad lines (missing or corrupt image, index out of range) are printed with file and line and
    skipped; returns the number of images written."""
    data_dir = Path(data_dir)
    formulas_path = data_dir / FORMULAS_FILE
    if not formulas_path.is_file():
        raise ShardError(f"{formulas_path} not found: {data_dir} is not a dataset in the "
                         "IM2LATEX-100K layout (preprocess.py --render/--generate makes one)")
    formulas = read_lines(formulas_path)
    total = 0
    for split in SPLITS:
        if not (data_dir / split_file(split)).is_file():
            continue
        entries, problems = read_split(data_dir, split, formulas)
        report = write_split(entries, data_dir / "shards" / split, split, progress=progress)
        problems += report.problems
        for msg in problems[:MAX_PROBLEMS_SHOWN]:
            print(f"warning: {msg}", file=sys.stderr)
        if len(problems) > MAX_PROBLEMS_SHOWN:
            print(f"warning: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more", file=sys.stderr)
        print(f"{split}: {report.written} images in {data_dir / 'shards' / split}, "
              f"{len(problems)} skipped")
        total += report.written
    return total


@dataclass
class Bucket:
    height: int
    width: int
    images: np.ndarray  # N x H x W uint8, memory-mapped
    names: list[str]
    formulas: list[str]

    def __getstate__(self) -> dict:
        """Pickled as the shard file's path, not its images: DataLoader workers started by
        spawn or forkserver (the default on macOS and Windows, and on Linux from Python 3.14)
        receive the dataset pickled, and would otherwise each get a copy of every image."""
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = Path(self.images.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["images"], Path):
            state["images"] = np.load(state["images"], mmap_mode="r", allow_pickle=False)
        self.__dict__.update(state)


def load_split(shard_dir: str | Path) -> list[Bucket]:
    """Open a split's shards lazily. Nothing is read into memory beyond the index."""
    shard_dir = Path(shard_dir)
    index_path = shard_dir / INDEX
    if not index_path.is_file():
        raise ShardError(f"{index_path} not found: run `python preprocess.py --data_path DIR` "
                         "to build the shards")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("version") != FORMAT_VERSION:
            raise ShardError(f"{index_path}: unsupported shard version {index.get('version')!r}")
        buckets = []
        for b in index["buckets"]:
            arr = np.load(shard_dir / b["file"], mmap_mode="r", allow_pickle=False)
            n = len(b["formulas"])
            if arr.dtype != np.uint8 or arr.shape != (n, b["height"], b["width"]) \
                    or len(b["names"]) != n:
                raise ShardError(f"{shard_dir / b['file']}: shape {arr.shape} does not match "
                                 f"{INDEX}; rebuild with preprocess.py")
            buckets.append(Bucket(b["height"], b["width"], arr, list(b["names"]),
                                  list(b["formulas"])))
    except (json.JSONDecodeError, KeyError, TypeError, OSError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{shard_dir}: unreadable shards ({e}); rebuild with preprocess.py") \
            from None
    return buckets
