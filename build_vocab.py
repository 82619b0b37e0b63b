"""Write DIR/vocab.json from the training formulas of a standard-layout dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.layout import FORMULAS_FILE, read_split
from data.vocab import Vocab


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data_path", required=True, help="dataset folder (standard layout)")
    p.add_argument("--min_count", type=int, default=1,
                   help="tokens seen fewer times in training become <unk>")
    p.add_argument("--output", help="where to write (default DATA_PATH/vocab.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    data_dir = Path(args.data_path)
    if not (data_dir / FORMULAS_FILE).is_file():
        print(f"error: {data_dir / FORMULAS_FILE} not found: not a dataset folder",
              file=sys.stderr)
        return 1
    entries, problems = read_split(data_dir, "train")
    for msg in problems[:10]:
        print(f"warning: {msg}", file=sys.stderr)
    if not entries:
        print(f"error: no training formulas in {data_dir}", file=sys.stderr)
        return 1
    vocab = Vocab.build((e.formula for e in entries), min_count=args.min_count)
    out = Path(args.output) if args.output else data_dir / "vocab.json"
    vocab.save(out)
    print(f"vocab: {len(vocab)} tokens from {len(entries)} training formulas -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
