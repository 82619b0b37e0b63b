"""Build an IM2LATEX-100K-layout dataset and/or its compact training shards.

    python preprocess.py --data_path DIR                       # layout -> DIR/shards/
    python preprocess.py --render FORMULAS --data_path DIR     # formula list -> layout -> shards
    python preprocess.py --generate 20000 --data_path DIR      # the embedded default dataset
    python preprocess.py --generate 20000 --data_path DIR --styles cm,times,palatino,cm-aa
                       # every training formula in cm plus --extra_styles (1) of the others

Render styles (data/styles.py): training formulas get the first of --styles plus
--extra_styles others chosen by a seeded hash of the formula (images NAME_STYLE.png), so the
data grows (extra_styles + 1)-fold rather than by the number of styles; validation and test
stay in --eval_style (cm), so scores stay comparable with earlier runs. A weight (``avant:3``)
makes a style drawn that many times as often as an extra style, for fonts the model reads worst.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data.build import BuildReport, Filters, build_dataset
from data.layout import read_lines
from data.render import RenderOptions
from data.shards import ShardError, shard_dataset
from data.styles import DEFAULT_STYLE, STYLES, get_style, parse_style_weights


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", required=True, help="dataset folder (standard layout)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--render", metavar="FORMULAS_FILE", nargs="+",
                     help="formula lists to normalize, split by --split_ratio and render (raw "
                          "or normalized, .gz ok)")
    src.add_argument("--generate", type=int, metavar="N",
                     help="render N random formulas from the built-in generator")
    p.add_argument("--validate_file", metavar="FILE",
                   help="with --render: formulas that all go to the validate split")
    p.add_argument("--test_file", metavar="FILE",
                   help="with --render: formulas that all go to the test split (unfiltered)")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="with --render: keep a seeded random N of the --render formulas")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="formulas to keep out of the dataset (e.g. the test set); repeatable")
    p.add_argument("--split_ratio", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the generator")
    p.add_argument("--max_tokens", type=int, default=Filters.max_tokens,
                   help="train/validate formulas longer than this are dropped")
    p.add_argument("--max_width", type=int, default=Filters.max_width)
    p.add_argument("--max_height", type=int, default=Filters.max_height)
    p.add_argument("--styles", default=DEFAULT_STYLE, metavar="A,B:W,...",
                   help="render styles of training formulas, the first for all of them "
                        "(NAME:W draws NAME W times as often as an extra style) "
                        f"(default {DEFAULT_STYLE}; valid: {', '.join(STYLES)})")
    p.add_argument("--extra_styles", type=int, default=1, metavar="K",
                   help="styles besides the first per training formula, picked by a hash "
                        "of the formula (default 1: the training images double)")
    p.add_argument("--eval_style", default=DEFAULT_STYLE,
                   help="style of validation and test images (default %(default)s)")
    p.add_argument("--no_recover", action="store_true",
                   help="with --render: no rewriting of shorthands (\\R -> \\mathbb { R }) and no "
                        "extra packages for training renders (data/recover.py): as v1.1 built")
    p.add_argument("--retry_failed", action="store_true",
                   help="render again the formulas an earlier run of this build recorded as "
                        "failing with a TeX error (DIR/formula_images_processed/.failed/); "
                        "default: report them failed again without TeX")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="TeX processes")
    p.add_argument("--no_shards", action="store_true", help="build the layout only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _styles(args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """--styles (names and weights) and --eval_style checked, with a one-line error naming
    the valid styles."""
    if args.extra_styles < 0:
        raise SystemExit("error: --extra_styles must be 0 or more")
    try:
        return parse_style_weights(args.styles), get_style(args.eval_style).name
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def build(args: argparse.Namespace) -> BuildReport:
    if args.generate is not None:
        from data.generate import generate_formulas

        if args.generate < 1:
            raise SystemExit("error: --generate needs a positive count")
        lines = generate_formulas(args.generate, seed=args.seed)
    else:
        lines = []
        for name in args.render:
            path = Path(name)
            if not path.is_file():
                raise SystemExit(f"error: formula file {path} not found")
            lines += read_lines(path)
        if not any(ln.strip() for ln in lines):
            raise SystemExit(f"error: {' '.join(args.render)}: no formulas")
    fixed = {}
    for split, name in (("validate", args.validate_file), ("test", args.test_file)):
        if name:
            if not Path(name).is_file():
                raise SystemExit(f"error: formula file {name} not found")
            fixed[split] = read_lines(name)
    exclude = [ln for f in args.exclude for ln in read_lines(f)]
    filters = Filters(args.max_tokens, args.max_width, args.max_height)
    styles, eval_style = _styles(args)
    report = build_dataset(lines, args.data_path, ratios=args.split_ratio, seed=args.seed,
                           exclude=exclude, fixed=fixed, sample=args.sample, filters=filters,
                           render_opts=RenderOptions(workers=args.workers),
                           progress=not args.quiet, styles=list(styles),
                           extra_styles=args.extra_styles, eval_style=eval_style,
                           style_weights=styles,
                           recovery=not args.no_recover, retry_failed=args.retry_failed)
    print("\n".join(report.lines()))
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    data_dir = Path(args.data_path)
    if args.render or args.generate is not None:
        build(args)
    if args.no_shards:
        return 0
    if shard_dataset(data_dir, progress=not args.quiet) == 0:
        print(f"error: no usable images found in {data_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
