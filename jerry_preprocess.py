"""Turn custom labelled images into a training set (standard layout + shards + vocab.json).

Build a dataset from a folder of images and a labels file, `NAME<TAB>formula` lines (CROHME and
most published sets; NAME with or without its extension) or `NAME formula-index` lines with
--formulas FILE (im2markup's layout, indices from 0):
    python jerry_preprocess.py --labels labels.tsv --images DIR --data_path OUT \\
        [--split_ratio 0.8 0.1 0.1] [--seed 0]

Build a dataset from answer folders, NAME2ID and ID2FORMULA:
    python jerry_preprocess.py --name2id NAME2ID.json --id2formula ID2FORMULA.json \\
        --images ROOT --data_path OUT [--split_ratio 0.9] [--seed 0]

A build makes a new --data_path, or replaces a dataset there with --overwrite (without it, a
used --data_path is refused and left as it was); the new dataset is made beside it and only
swapped in once complete. --split_ratio takes TRAIN [VALIDATE TEST] shares (one number: the
rest validates); `1 0 0` and `0 0 1` put every image in one split.

Append a folder of images that all show one formula to a dataset (created if missing):
    python jerry_preprocess.py --single_label FOLDER --label "- \\frac { 1 } { 3 }" \\
        --data_path OUT
An image already in the dataset (same file content) is skipped, so no image is ever in two
splits.

Built images are named by a hash of their source file's content; OUT/manifest.tsv maps each
built name to its split and source file. Images of any format and polarity are normalized as
inference.py does (scans with light ink on a dark background included). Formulas are normalized
with the project's tokenizer; dropped backslashes of known commands are restored
(`frac { 1 } { 3 }` -> `\\frac { 1 } { 3 }`) and the answer keys' plain spellings mapped
(`{{ }}` -> `\\{ \\}`, `inf` -> `\\infty`, `<=` -> `\\leq`, `>=` -> `\\geq`, `U` between two
intervals -> `\\cup`). Problems (malformed lines, missing images, duplicate names, missing keys,
folders not in NAME2ID, unreadable images) are listed and skipped; with --strict any problem
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.build import assign_splits
from data.custom import (
    CustomDataError,
    Labelled,
    LabelReport,
    clean_formula,
    label_images,
    load_id2formula,
    load_name2id,
)
from data.files import atomic_open, atomic_write
from data.image import IMAGE_SUFFIXES, ImageError, read_user_image
from data.labels import read_labels
from data.layout import FORMULAS_FILE, IMAGES_DIR, SPLITS, read_lines, split_file, write_layout
from data.normalize import NormalizeError
from data.shards import ShardError, shard_dataset
from data.vocab import Vocab

MANIFEST = "manifest.tsv"
MANIFEST_HEADER = "image\tsplit\tsource"
DEFAULT_SPLIT_RATIO = (0.9, 0.1, 0.0)


@dataclass(frozen=True)
class BuildConfig:
    """The build options, checked once."""

    data_dir: Path
    ratios: tuple[float, float, float]
    seed: int
    overwrite: bool
    strict: bool
    quiet: bool


@dataclass(frozen=True)
class Built:
    """One image written into the dataset."""

    name: str
    formula: str
    source: Path


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", required=True, help="output dataset folder")
    p.add_argument("--labels", help="labels file: NAME<TAB>formula, or NAME INDEX with --formulas")
    p.add_argument("--formulas", help="with --labels: the formula file that INDEX points into")
    p.add_argument("--name2id", help="JSON object: folder name (or path) -> group id")
    p.add_argument("--id2formula", help='JSON list of groups {"(GROUP,ITEM)": formula}')
    p.add_argument("--images", help="the images: with --labels the folder the names are in, "
                                    "with --name2id the folder holding one sub-folder per name")
    p.add_argument("--single_label", metavar="FOLDER",
                   help="a folder of images that all show --label")
    p.add_argument("--label", help="the formula of every --single_label image")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="with --single_label: the split to append to")
    p.add_argument("--split_ratio", type=float, nargs="+", metavar="SHARE",
                   help="TRAIN [VALIDATE TEST] shares (default: "
                        f"{' '.join(map(str, DEFAULT_SPLIT_RATIO))}; one number: the rest "
                        "validates)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset that --data_path already holds")
    p.add_argument("--strict", action="store_true", help="exit 1 if anything was skipped")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def split_ratios(values: list[float] | None) -> tuple[float, float, float]:
    """TRAIN [VALIDATE TEST] shares as three; CustomDataError when unusable."""
    if values is None:
        return DEFAULT_SPLIT_RATIO
    if len(values) == 1 and 0 <= values[0] <= 1:
        return values[0], 1 - values[0], 0.0
    if len(values) == 3 and min(values) >= 0 and sum(values) > 0:
        return values[0], values[1], values[2]
    raise CustomDataError("--split_ratio takes TRAIN VALIDATE TEST (non-negative, not all 0) "
                          f"or one TRAIN share in [0, 1]; got {' '.join(map(str, values))}")


def build_config(args: argparse.Namespace) -> BuildConfig:
    return BuildConfig(Path(args.data_path).resolve(), split_ratios(args.split_ratio), args.seed,
                       args.overwrite, args.strict, args.quiet)


def image_name(source: Path) -> str:
    """A stable ASCII name from the file's content: the same image under two paths (or built
    twice) gets one name, which is what lets a dataset refuse it a second place."""
    return hashlib.sha1(source.read_bytes()).hexdigest()[:12] + ".png"


def save_image(item: Labelled, name: str, out_dir: Path) -> None:
    """Normalize one image (as inference.py does) and write it as `name`.

    The bounds of normalize_user_image (noise, dot patterns, huge scales) raise ImageError,
    so a hostile file is reported and skipped like an unreadable one, never aborting a build."""
    img = read_user_image(item.image)
    with atomic_open(out_dir / name) as f:
        Image.fromarray(np.ascontiguousarray(img)).save(f, format="PNG")


def write_images(items: list[Labelled], data_dir: Path, problems: list[str],
                 taken: dict[str, str]) -> list[Built]:
    """The items whose image could be read and is not already in `taken` (name -> where it
    is), which each written image joins."""
    out_dir = data_dir / IMAGES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        try:
            name = image_name(item.image)
            if name in taken:
                problems.append(f"{item.image}: same image as {taken[name]}, skipped")
                continue
            save_image(item, name, out_dir)
        except (ImageError, OSError) as e:
            problems.append(f"{item.image}: {e}")
            continue
        taken[name] = str(item.image)
        written.append(Built(name, item.formula, item.image))
    return written


def existing_layout(data_dir: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    if not (data_dir / FORMULAS_FILE).is_file():
        return [], {s: [] for s in SPLITS}
    formulas = read_lines(data_dir / FORMULAS_FILE)
    rows = {}
    for s in SPLITS:
        path = data_dir / split_file(s)
        lines = read_lines(path) if path.is_file() else []
        rows[s] = [(ln.split()[0], int(ln.split()[1])) for ln in lines if len(ln.split()) == 2]
    return formulas, rows


def read_manifest(data_dir: Path) -> list[str]:
    path = data_dir / MANIFEST
    return read_lines(path)[1:] if path.is_file() else []


def add_rows(data_dir: Path, built: list[Built], split_of: list[str]) -> None:
    """Append images to the layout and the manifest, reusing formula lines already present."""
    formulas, rows = existing_layout(data_dir)
    manifest = read_manifest(data_dir)
    index = {f: i for i, f in enumerate(formulas)}
    for b, split in zip(built, split_of):
        if b.formula not in index:
            index[b.formula] = len(formulas)
            formulas.append(b.formula)
        rows[split].append((b.name, index[b.formula]))
        manifest.append(f"{b.name}\t{split}\t{b.source.resolve()}")
    write_layout(data_dir, formulas, rows)
    atomic_write(data_dir / MANIFEST, "".join(ln + "\n" for ln in [MANIFEST_HEADER, *manifest]))


def check_target(cfg: BuildConfig) -> None:
    """Refuse, before any work, a --data_path that a build would have to replace unasked, or
    one that holds something other than a dataset (--overwrite deletes only datasets)."""
    d = cfg.data_dir
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return
    if not d.is_dir():
        raise CustomDataError(f"--data_path {d}: exists and is not a folder")
    if not (d / FORMULAS_FILE).is_file():
        raise CustomDataError(f"--data_path {d} holds files but no dataset ({FORMULAS_FILE}); "
                              "--overwrite replaces only a dataset: choose a new folder")
    if not cfg.overwrite:
        raise CustomDataError(f"--data_path {d} already holds a dataset; pass --overwrite to "
                              "replace it (or --single_label to add images to it)")


def install(staging: Path, data_dir: Path) -> None:
    """Swap the finished dataset in: the old one is moved aside first and deleted last, so an
    interrupted build never leaves a half-replaced dataset."""
    old = None
    if data_dir.exists():
        old = data_dir.with_name(f".{data_dir.name}.old-{os.getpid()}")
        data_dir.rename(old)
    staging.rename(data_dir)
    if old is not None:
        shutil.rmtree(old)


def finish(data_dir: Path, quiet: bool) -> None:
    """Shards and the vocabulary of the training split."""
    shard_dataset(data_dir, progress=not quiet)
    formulas, rows = existing_layout(data_dir)
    train = [formulas[i] for _, i in rows["train"]]
    if train:
        vocab = Vocab.build(train)
        vocab.save(data_dir / "vocab.json")
        print(f"vocab: {len(vocab)} tokens")


def summary(data_dir: Path) -> str:
    rows = existing_layout(data_dir)[1]
    return f"dataset: {data_dir} (" + ", ".join(f"{s} {len(rows[s])}" for s in SPLITS) + ")"


def build(cfg: BuildConfig, items: list[Labelled], problems: list[str]) -> list[Built]:
    """A new dataset of `items` split by cfg.ratios, made beside --data_path and swapped in."""
    data_dir = cfg.data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = data_dir.with_name(f".{data_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        built = write_images(items, staging, problems, {})
        if built:
            split_of = assign_splits(len(built), cfg.ratios, cfg.seed)
            add_rows(staging, built, split_of)
            finish(staging, cfg.quiet)  # its messages name the staging folder
            install(staging, data_dir)
            print(summary(data_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return built


def append(cfg: BuildConfig, items: list[Labelled], split: str,
           problems: list[str]) -> list[Built]:
    """Add `items` to one split of the dataset at --data_path (made if missing); an image
    already in any split is skipped."""
    _, rows = existing_layout(cfg.data_dir)
    taken = {name: f"{name} in the {s} split" for s in SPLITS for name, _ in rows[s]}
    built = write_images(items, cfg.data_dir, problems, taken)
    if built:
        add_rows(cfg.data_dir, built, [split] * len(built))
        finish(cfg.data_dir, cfg.quiet)
        print(summary(cfg.data_dir))
    return built


def single_label_items(args: argparse.Namespace) -> LabelReport:
    if args.label is None:
        raise CustomDataError("--single_label needs --label")
    folder = Path(args.single_label)
    if not folder.is_dir():
        raise CustomDataError(f"--single_label {folder}: folder not found")
    try:
        formula, restored = clean_formula(args.label)
    except NormalizeError as e:
        raise CustomDataError(f"--label {args.label!r}: {e}") from None
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CustomDataError(f"--single_label {folder}: no images")
    return LabelReport([Labelled(f, formula, "--label") for f in files], [],
                       restored * len(files))


def build_items(args: argparse.Namespace) -> LabelReport:
    """The labelled images of the --labels or the --name2id mode."""
    if args.labels:
        if args.name2id or args.id2formula or not args.images:
            raise CustomDataError("--labels takes --images (and --formulas), not --name2id")
        return read_labels(args.labels, args.images, args.formulas)
    if not (args.name2id and args.id2formula and args.images):
        raise CustomDataError("give --labels and --images, or --name2id, --id2formula and "
                              "--images (or --single_label and --label)")
    return label_images(args.images, load_name2id(args.name2id),
                        load_id2formula(args.id2formula))


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    cfg = build_config(args)
    if args.single_label:
        report = single_label_items(args)
    else:
        check_target(cfg)
        report = build_items(args)
    problems = list(report.problems)
    if args.single_label:
        built = append(cfg, report.labelled, args.split, problems)
    else:
        built = build(cfg, report.labelled, problems)
    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"labelled images: {len(report.labelled)}, written: {len(built)}, skipped: "
          f"{len(problems)} problems, formulas respelled (backslashes, answer-key symbols): "
          f"{report.restored}")
    if not built:
        print("error: no image could be labelled and written", file=sys.stderr)
        return 1
    return 1 if cfg.strict and problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CustomDataError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
