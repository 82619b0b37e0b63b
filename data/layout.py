"""The IM2LATEX-100K on-disk layout: reading it tolerantly and writing it exactly.

Readers never stop at the first bad line: a dataset of 100K lines with three broken ones should
still be usable, so problems are collected with file and line number and returned to the caller.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data.files import atomic_write

IMAGES_DIR = "formula_images_processed"
FORMULAS_FILE = "im2latex_formulas.norm.lst"
SPLITS = ("train", "validate", "test")
# Longer formulas are not trained on: the IM2LATEX-100K filter, applied when a dataset is built
# (data.build.Filters, train and validate only) and again when it is loaded for training
# (data.dataset.FormulaDataset, train.py --max_len). A training filter, not the decoding cap
# (im2latex.decoding.MAX_LEN), though both are 150 today.
MAX_TRAIN_TOKENS = 150


def split_file(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"im2latex_{split}_filter.lst"


@dataclass(frozen=True)
class Entry:
    """One labelled image: where it is, its formula, and where the label came from."""

    image: Path
    formula: str
    source: str  # "file:line", for error messages


def read_lines(path: str | Path) -> list[str]:
    """Lines of a text file (`.gz` accepted), split on `\\n` only.

    `str.splitlines` would also split on `\\x0b`, `\\x1c` and friends, which do occur in scraped
    LaTeX, and would silently shift every later formula index by one."""
    path = Path(path)
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def read_split(data_dir: str | Path, split: str,
               formulas: Sequence[str] | None = None) -> tuple[list[Entry], list[str]]:
    """Entries of one split of a standard-layout dataset, plus a list of problems found.

    A line whose image is missing or whose formula index is out of range is reported (file and
    line) and skipped; everything else is returned."""
    data_dir = Path(data_dir)
    if formulas is None:
        formulas = read_lines(data_dir / FORMULAS_FILE)
    lst = data_dir / split_file(split)
    return read_matching(lst, data_dir / IMAGES_DIR, formulas)


def read_matching(matching_file: str | Path, images_dir: str | Path,
                  formulas: Sequence[str]) -> tuple[list[Entry], list[str]]:
    """Read `IMAGE FORMULA_INDEX` lines (the `*_filter.lst` files and `val.matching.txt` share
    this form) into entries, collecting problems instead of raising on the first one."""
    matching_file, images_dir = Path(matching_file), Path(images_dir)
    entries: list[Entry] = []
    problems: list[str] = []
    for lineno, line in enumerate(read_lines(matching_file), start=1):
        where = f"{matching_file}:{lineno}"
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            problems.append(f"{where}: expected 'IMAGE FORMULA_INDEX', got {line[:80]!r}")
            continue
        name, idx = parts[0], int(parts[1])
        if not 0 <= idx < len(formulas):
            problems.append(f"{where}: formula index {idx} out of range "
                            f"(the formula file has {len(formulas)} lines)")
            continue
        image = images_dir / name
        if not image.is_file():
            problems.append(f"{where}: image {image} not found")
            continue
        if not formulas[idx].strip():
            problems.append(f"{where}: formula {idx} is empty")
            continue
        entries.append(Entry(image, formulas[idx].strip(), where))
    return entries, problems


def write_layout(data_dir: str | Path, formulas: Sequence[str],
                 splits: dict[str, Iterable[tuple[str, int]]]) -> None:
    """Write the formula list and the split files; images are written by the renderer."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(data_dir / FORMULAS_FILE, "".join(f + "\n" for f in formulas))
    for split in SPLITS:
        rows = splits.get(split, ())
        atomic_write(data_dir / split_file(split), "".join(f"{n} {i}\n" for n, i in rows))
