"""Export a training checkpoint for shipping: half-precision weights, config and vocabulary.

    python export_model.py runs/ref/best.pt checkpoints/im2latex.pt --note "small CPU model"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoint import CheckpointError, export_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="training checkpoint (.pt) or run folder")
    p.add_argument("dst", help="where to write the shipped model")
    p.add_argument("--note", default="", help="a line stored with the weights")
    args = p.parse_args(argv)
    try:
        out = export_weights(args.src, args.dst, args.note)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = Path(args.dst).stat().st_size / 2**20
    print(f"exported epoch {out['epoch']}, step {out['step']} -> {args.dst} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
