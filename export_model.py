"""Export a training checkpoint for shipping: half-precision weights, config and vocabulary;
or (--onnx) as ONNX graphs for the torch-free runtime (im2latex/onnx_backend.py).

    python export_model.py runs/ref/best.pt checkpoints/im2latex.pt --note "small CPU model"
    python export_model.py checkpoints/im2latex.pt --onnx checkpoints/im2latex_onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoint import CheckpointError, export_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="training checkpoint (.pt) or run folder")
    p.add_argument("dst", nargs="?", help="where to write the shipped model (.pt)")
    p.add_argument("--note", default="", help="a line stored with the weights")
    p.add_argument("--onnx", metavar="DIR",
                   help="also (or only) write the model as ONNX graphs into this folder, "
                        "replacing an earlier export there")
    args = p.parse_args(argv)
    if not args.dst and not args.onnx:
        p.error("give DST, --onnx DIR, or both")
    try:
        if args.dst:
            out = export_weights(args.src, args.dst, args.note)
            size = Path(args.dst).stat().st_size / 2**20
            print(f"exported epoch {out['epoch']}, step {out['step']} -> {args.dst} "
                  f"({size:.1f} MiB)")
        if args.onnx:
            from im2latex.onnx_export import export_onnx  # torch.onnx only when asked

            # from the shipped .pt when one was just written: the ONNX graphs then record
            # that file's digest (and its half-precision weights), so the two match
            meta = export_onnx(args.dst or args.src, args.onnx)
            size = sum(f.stat().st_size for f in Path(args.onnx).iterdir()) / 2**20
            print(f"exported ONNX graphs -> {args.onnx} ({size:.1f} MiB; largest log-prob "
                  f"difference from PyTorch on test images {meta['max_diff']:.1e}"
                  f"{'; with its calibration' if meta['calibrated'] else ''})")
            if meta["calibration_note"]:
                print(f"note: {meta['calibration_note']}", file=sys.stderr)
    except (CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
