"""Turn custom labelled images into a training set (standard layout + shards + vocab.json).

Build a dataset from answer folders, NAME2ID and ID2FORMULA:
    python jerry_preprocess.py --name2id NAME2ID.json --id2formula ID2FORMULA.json \\
        --images ROOT --data_path OUT [--split_ratio 0.9] [--seed 0]

Append a folder of images that all show one formula to a dataset (created if missing):
    python jerry_preprocess.py --single_label FOLDER --label "- \\frac { 1 } { 3 }" \\
        --data_path OUT

Images of any format and polarity are normalized as inference.py does (scans with light ink on
a dark background included). Formulas are normalized with the project's tokenizer; dropped
backslashes of known commands are restored (`frac { 1 } { 3 }` -> `\\frac { 1 } { 3 }`) and
the answer keys' plain spellings mapped (`{{ }}` -> `\\{ \\}`, `inf` -> `\\infty`, `<=` ->
`\\leq`, `>=` -> `\\geq`, `U` between two intervals -> `\\cup`).
Problems (missing keys, folders not in NAME2ID, unreadable images) are listed and skipped;
with --strict any problem makes the exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data.custom import (
    IMAGE_SUFFIXES,
    CustomDataError,
    Labelled,
    clean_formula,
    label_images,
    load_id2formula,
    load_name2id,
)
from data.image import ImageError, load_image, model_input, normalize_user_image
from data.layout import FORMULAS_FILE, IMAGES_DIR, SPLITS, read_lines, split_file, write_layout
from data.normalize import NormalizeError
from data.shards import ShardError, shard_dataset
from data.vocab import Vocab


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", required=True, help="output dataset folder")
    p.add_argument("--name2id", help="JSON object: folder name (or path) -> group id")
    p.add_argument("--id2formula", help='JSON list of groups {"(GROUP,ITEM)": formula}')
    p.add_argument("--images", help="folder holding one sub-folder per NAME2ID name")
    p.add_argument("--single_label", metavar="FOLDER",
                   help="a folder of images that all show --label")
    p.add_argument("--label", help="the formula of every --single_label image")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="with --single_label: the split to append to")
    p.add_argument("--split_ratio", type=float, default=0.9,
                   help="share of images for training (the rest validates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 if anything was skipped")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def save_image(item: Labelled, out_dir: Path) -> str:
    """Normalize one image and write it under a stable ASCII name; returns the name.

    The bounds of normalize_user_image (noise, dot patterns, huge scales) raise ImageError,
    so a hostile file is reported and skipped like an unreadable one, never aborting a build."""
    img = model_input(normalize_user_image(load_image(item.image)))
    digest = hashlib.sha1(str(item.image.resolve()).encode()).hexdigest()[:12]
    name = f"{digest}.png"
    tmp = out_dir / f".{name}.tmp"
    Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    tmp.replace(out_dir / name)
    return name


def write_images(items: list[Labelled], data_dir: Path,
                 problems: list[str]) -> list[tuple[str, str]]:
    """(image name, formula) for every item whose image could be read."""
    out_dir = data_dir / IMAGES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in items:
        try:
            written.append((save_image(item, out_dir), item.formula))
        except (ImageError, OSError) as e:
            problems.append(f"{item.image}: {e}")
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


def add_rows(data_dir: Path, pairs: list[tuple[str, str]], split_of: list[str]) -> None:
    """Append (image, formula) pairs to the layout, reusing formula lines already present."""
    formulas, rows = existing_layout(data_dir)
    index = {f: i for i, f in enumerate(formulas)}
    for (name, formula), split in zip(pairs, split_of):
        if formula not in index:
            index[formula] = len(formulas)
            formulas.append(formula)
        row = (name, index[formula])
        if row not in rows[split]:
            rows[split].append(row)
    write_layout(data_dir, formulas, rows)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    data_dir = Path(args.data_path)
    problems: list[str] = []
    if args.single_label:
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
        items = [Labelled(f, formula, "--label") for f in files]
        pairs = write_images(items, data_dir, problems)
        add_rows(data_dir, pairs, [args.split] * len(pairs))
        found = len(files)
    else:
        if not (args.name2id and args.id2formula and args.images):
            raise CustomDataError("give --name2id, --id2formula and --images (or --single_label"
                                  " and --label)")
        if not 0 < args.split_ratio <= 1:
            raise CustomDataError("--split_ratio must be in (0, 1]")
        report = label_images(args.images, load_name2id(args.name2id),
                              load_id2formula(args.id2formula))
        problems += report.problems
        restored = report.restored
        found = len(report.labelled)
        pairs = write_images(report.labelled, data_dir, problems)
        order = list(range(len(pairs)))
        random.Random(args.seed).shuffle(order)
        n_train = len(pairs) if len(pairs) < 2 else min(len(pairs) - 1,
                                                        round(len(pairs) * args.split_ratio))
        split_of = ["validate"] * len(pairs)
        for i in order[:n_train]:
            split_of[i] = "train"
        add_rows(data_dir, pairs, split_of)

    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    print(f"labelled images: {found}, written: {len(pairs)}, skipped: {len(problems)} "
          f"problems, formulas respelled (backslashes, answer-key symbols): {restored}")
    if not pairs:
        print("error: no image could be labelled and written", file=sys.stderr)
        return 1
    shard_dataset(data_dir, progress=not args.quiet)
    formulas, rows = existing_layout(data_dir)
    train = [formulas[i] for _, i in rows["train"]]
    if train:
        vocab = Vocab.build(train)
        vocab.save(data_dir / "vocab.json")
        print(f"vocab: {len(vocab)} tokens -> {data_dir / 'vocab.json'}")
    return 1 if args.strict and problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CustomDataError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
