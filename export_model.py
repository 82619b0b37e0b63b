"""Export a training checkpoint for shipping: half-precision weights, config and vocabulary;
or (--onnx) as ONNX graphs for the torch-free runtime (im2latex/onnx_backend.py).

    python export_model.py runs/ref/best.pt checkpoints/im2latex.pt --note "small CPU model"
    python export_model.py checkpoints/im2latex.pt --onnx checkpoints/im2latex_onnx
    python export_model.py runs/ft/last.pt averaged.pt --average checkpoints/im2latex.pt
                       # the mean of a fine-tuned model's weights and those it started from
    python export_model.py checkpoints/im2latex.pt start.pt --cnn_widths 64 128 256 256 --seed 17
                       # what `train.py --init_from checkpoints/im2latex.pt --cnn_widths 64 128
                       # 256 256 --seed 17` starts from, to average that run with (--average)

--average: the exported weights are the mean of SRC's and these checkpoints' (model/average.py:
why, and which checkpoints can be averaged); give a path twice to weigh it twice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.average import average_checkpoints
from model.checkpoint import CheckpointError, export_weights, load_checkpoint, model_from_checkpoint
from model.widen import WidenError, grown


def grown_checkpoint(src: str, cnn_widths: list[int], seed: int) -> dict:
    """SRC's checkpoint with its model grown to ``cnn_widths`` exactly as `train.py --init_from
    SRC --cnn_widths ... --seed SEED` grows it (model/widen.py draws the new units from the
    seed): the run's step 0. A grown run can only be averaged with weights of its own shape,
    and this is the one that computes what SRC computes."""
    ckpt = load_checkpoint(src)
    model, _ = model_from_checkpoint(ckpt, source=src)
    try:
        model = grown(model, {"cnn_widths": tuple(cnn_widths)}, seed)
    except WidenError as e:
        raise CheckpointError(f"{src}: {e}") from None
    return {**ckpt, "model": model.state_dict(), "model_config": model.cfg.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="training checkpoint (.pt) or run folder")
    p.add_argument("dst", nargs="?", help="where to write the shipped model (.pt)")
    p.add_argument("--note", default="", help="a line stored with the weights")
    p.add_argument("--onnx", metavar="DIR",
                   help="also (or only) write the model as ONNX graphs into this folder, "
                        "replacing an earlier export there")
    p.add_argument("--average", nargs="+", metavar="CKPT", default=[],
                   help="export the mean of SRC's weights and these checkpoints' (one model, "
                        "fine-tuned from common weights)")
    p.add_argument("--cnn_widths", type=int, nargs="+", metavar="N",
                   help="export SRC grown to these conv widths (model/widen.py), as a run with "
                        "`--init_from SRC --cnn_widths ... --seed` starts; needs --seed")
    p.add_argument("--seed", type=int, help="with --cnn_widths: the run's --seed, from which "
                   "the new units are drawn")
    args = p.parse_args(argv)
    if args.cnn_widths and (args.seed is None or args.average or not args.dst):
        p.error("--cnn_widths needs DST and --seed (the run's), and no --average: average the "
                "run with the grown file afterwards")
    if not args.dst and not args.onnx:
        p.error("give DST, --onnx DIR, or both")
    if args.average and not args.dst:
        p.error("--average needs DST: the ONNX graphs are made from the averaged .pt written there")
    try:
        if args.dst:
            changed = (average_checkpoints([args.src, *args.average]) if args.average else
                       grown_checkpoint(args.src, args.cnn_widths, args.seed)
                       if args.cnn_widths else None)
            out = export_weights(args.src, args.dst, args.note, changed)
            size = Path(args.dst).stat().st_size / 2**20
            how = (f"the mean of {1 + len(args.average)} checkpoints' weights, " if args.average
                   else f"grown to conv widths {args.cnn_widths}, " if args.cnn_widths else "")
            print(f"exported {how}epoch {out['epoch']}, step {out['step']} -> {args.dst} "
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
