"""Does respelling (data/spelling.py) keep every training formula's image?

For a dataset folder it counts, per split, the formulas that use each spelling of each font
switch, prime and arrow, and the accent arguments left bare (the evidence for the "references"
spellings), and the training formulas `respell` changes; then it renders a random sample of the
changed ones before and after, strictly, and counts identical images among those whose
original renders. `--base` renders one spelling against another, to check one rule alone.

    python bench/spelling_check.py --data_path FULL --sample 6000 --seed 2
    spelling_check: train 38,060 of 148,712 formulas respelled (references); renders identical
    ... of ... sampled whose original renders
    python bench/spelling_check.py --data_path FULL --spelling references_braced \
        --base references --sample 1200 --seed 3
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.layout import FORMULAS_FILE, read_lines, split_file  # noqa: E402
from data.spelling import ACCENTS, COMMAND_OF, SPELLINGS, respell  # noqa: E402


def split_formulas(data_dir: Path, split: str, formulas: list[str]) -> list[str]:
    """The distinct formulas a split's filter file points at."""
    ids = {int(line.split()[1]) for line in read_lines(data_dir / split_file(split))}
    return [formulas[i] for i in sorted(ids)]


# the two spellings of each thing that typesets the same (data/spelling.py)
PAIRS = [*COMMAND_OF.items(), ("'", "\\prime"), ("\\to", "\\rightarrow")]


def spelling_counts(formulas: list[str]) -> Counter:
    """Formulas using each spelling of each pair (a formula may count for both)."""
    counts: Counter = Counter()
    for f in formulas:
        tokens = set(f.split())
        for pair in PAIRS:
            counts.update(t for t in pair if t in tokens)
    return counts


def bare_accents(formulas: list[str]) -> tuple[int, int]:
    """(accent arguments not braced, all accent arguments) of ACCENTS, over the formulas."""
    bare = total = 0
    for f in formulas:
        tokens = f.split()
        for t, after in zip(tokens, tokens[1:]):
            if t in ACCENTS:
                total += 1
                bare += after != "{"
    return bare, total


def identical_renders(pairs: list[tuple[str, str]], show: int) -> tuple[int, int]:
    """(renders identical, original rendered) over (original, respelled) pairs."""
    import numpy as np

    from data.normalize import detokenize
    from data.render import RenderOptions, render_formulas

    strict = RenderOptions(strict=True)
    before = render_formulas([detokenize(a) for a, _ in pairs], strict, progress=True)
    after = render_formulas([detokenize(b) for _, b in pairs], strict, progress=True)
    rendered = same = 0
    for (a, b), x, y in zip(pairs, before, after):
        if x is None:
            continue
        rendered += 1
        if y is not None and x.shape == y.shape and bool(np.array_equal(x, y)):
            same += 1
        elif show > 0:
            show -= 1
            print(f"    differs:\n      before: {a[:200]}\n      after:  {b[:200]}")
    return same, rendered


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", type=Path, required=True, help="a preprocess.py dataset folder")
    p.add_argument("--spelling", default="references", choices=list(SPELLINGS))
    p.add_argument("--base", default="as_is", choices=["as_is", *SPELLINGS],
                   help="render formulas in this spelling against --spelling, where the two "
                        "differ (references against references_braced isolates the accent rule)")
    p.add_argument("--sample", type=int, default=300, help="changed formulas to render (0: none)")
    p.add_argument("--show", type=int, default=5, help="print this many that render differently")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    formulas = read_lines(args.data_path / FORMULAS_FILE)
    fonts = [t for pair in PAIRS for t in pair]
    print("formulas using each spelling (distinct formulas per split):")
    print("  split     " + " ".join(f"{f:>9}" for f in fonts))
    splits = {s: split_formulas(args.data_path, s, formulas) for s in ("train", "validate", "test")}
    for split, these in splits.items():
        c = spelling_counts(these)
        print(f"  {split:9} " + " ".join(f"{c[f]:9,}" for f in fonts))
    for split, these in splits.items():
        bare, total = bare_accents(these)
        print(f"accent arguments not braced ({split}): {bare:,} of {total:,}")
    train = splits["train"]
    base = train if args.base == "as_is" else [respell(f, args.base) for f in train]
    changed = [(b, g) for f, b in zip(train, base) if (g := respell(f, args.spelling)) != b]
    line = (f"spelling_check: train {len(changed):,} of {len(train):,} formulas respelled "
            f"({args.spelling}" + ("" if args.base == "as_is" else f" against {args.base}") + ")")
    if args.sample:
        pairs = random.Random(args.seed).sample(changed, min(args.sample, len(changed)))
        same, rendered = identical_renders(pairs, args.show)
        line += f"; renders identical {same} of {rendered} sampled whose original renders"
    print(line)


if __name__ == "__main__":
    main()
