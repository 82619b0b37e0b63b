"""Decoding throughput and memory, ours vs the luopeixiang/im2latex baseline, same model and data.

Beam search (beam 5) and greedy decoding of one batch (32 images, 64 x 320 by default), both
sides with the same weights and the same max_len.  Each (side, mode) runs in its own subprocess,
so the peak RSS reported is that decode's own.  The last line is the summary:

    python -m bench.decode_speed --threads 2
    decode_speed: beam5 ours 7.93 img/s, baseline 0.40 img/s, 20.0x, peak RSS ours 452 MB; ...

With random weights decoding rarely stops early, so both sides run close to max_len steps.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/decode_speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline import baseline_beam_search, baseline_greedy, to_rgb
from bench.common import (
    BOS,
    EOS,
    build_models,
    child_main,
    describe,
    images,
    parse,
    parser,
    run_side,
)


def _ours(mode: str):
    def side(args):
        model, _ = build_models(args)
        model.eval()
        imgs = images(args)
        if mode == "beam":
            return lambda: model.beam_search(
                imgs, BOS, EOS, args.max_len, beam_size=args.beam_size, amp=bool(args.amp)
            )
        return lambda: model.greedy(imgs, BOS, EOS, args.max_len, amp=bool(args.amp))

    return side


def _baseline(mode: str):
    def side(args):
        _, model = build_models(args)
        model.eval()
        imgs = to_rgb(images(args))
        if mode == "beam":
            return lambda: baseline_beam_search(model, imgs, BOS, EOS, args.max_len, args.beam_size)
        return lambda: baseline_greedy(model, imgs, BOS, args.max_len)

    return side


SIDES = {
    "ours_beam": _ours("beam"),
    "baseline_beam": _baseline("beam"),
    "ours_greedy": _ours("greedy"),
    "baseline_greedy": _baseline("greedy"),
}


def main() -> None:
    p = parser(__doc__.splitlines()[0], steps=1, warmup=0)
    p.add_argument("--max_len", type=int, default=100, help="the same for both sides")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--modes", default="beam,greedy")
    args = parse(p)
    if args.side:
        return child_main(args, SIDES)
    baseline_name = args.baseline_repo or "stand-in (bench/baseline.py)"
    print(f"decode_speed: batch {args.batch}, {args.height}x{args.width}, max_len {args.max_len}, "
          f"beam {args.beam_size}, vocab {args.vocab}, {args.device}, {args.threads} threads, "
          f"amp={args.amp}, "
          f"baseline={baseline_name}", flush=True)  # fmt: skip
    summary = []
    for mode in args.modes.split(","):
        r = {}
        for who in ("ours", "baseline"):
            r[who] = run_side("bench.decode_speed", f"{who}_{mode}", sys.argv[1:])
            print(describe(f"{who} {mode}", r[who]), flush=True)
        name = f"beam{args.beam_size}" if mode == "beam" else mode
        ratio = r["ours"]["img_per_s"] / r["baseline"]["img_per_s"]
        summary.append(f"{name} ours {r['ours']['img_per_s']:.2f} img/s, baseline "
                       f"{r['baseline']['img_per_s']:.2f} img/s, {ratio:.1f}x, peak RSS ours "
                       f"{r['ours']['peak_rss_mb']:.0f} MB")  # fmt: skip
    print("decode_speed: " + "; ".join(summary))


if __name__ == "__main__":
    main()
