"""Training-step throughput, ours vs the luopeixiang/im2latex baseline, on the same model and data.

A step is forward + loss + backward + Adam on a batch of B images (64 x 320 by default) with
~100-token targets.  Each side runs in its own subprocess; the last line is the summary:

    python bench/train_speed.py [--device cuda] [--batch 32] [--batch_norm 1]
    train_speed: ours 9.16 img/s, baseline 1.44 img/s, 6.3x     (2-core AMD EPYC, bf16 amp)

Ours runs with --amp 1 by default (bf16 CNN, as the trainer does on CPU); --amp 0 times fp32.
After the timing, our step is run once more to count its work and print its arithmetic floor
(bench/floor.py; --floor 0 skips it).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/train_speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.baseline import baseline_loss, to_rgb
from bench.common import PAD, build_models, child_main, describe, images, parse, parser, run_side
from bench.floor import describe_floor


def _targets(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 2)
    return torch.randint(4, args.vocab, (args.batch, args.tgt_len + 1), generator=g).to(args.device)


def ours(args):
    model, _ = build_models(args, batch_norm=bool(args.batch_norm))
    model.train()
    opt = model.configure_optimizer(lr=1e-4)  # as train.py
    imgs, tgt = images(args), _targets(args)

    def step():
        logits = model(imgs, tgt[:, :-1], teacher_forcing=args.teacher_forcing, amp=bool(args.amp))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def baseline(args):
    _, model = build_models(args)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    imgs, tgt = images(args), _targets(args)

    def step():
        probs = model(to_rgb(imgs), tgt[:, :-1], args.teacher_forcing)
        loss = baseline_loss(probs, tgt[:, 1:], PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = parser(__doc__.splitlines()[0], steps=2, warmup=2)
    p.add_argument("--tgt_len", type=int, default=100, help="decoder steps per formula")
    p.add_argument("--teacher_forcing", type=float, default=1.0)
    p.add_argument("--batch_norm", type=int, default=0,
                   help="ours with the encoder's batch norm, as train.py's default model (0/1; "
                        "off by default: the baseline has none)")
    p.add_argument("--floor", type=int, default=1,
                   help="also count our step's work and print its arithmetic floor (0/1)")
    args = parse(p)
    if args.side:
        return child_main(args, {"ours": ours, "baseline": baseline},
                          counted={"ours"} if args.floor else ())
    argv = sys.argv[1:]
    baseline_name = args.baseline_repo or "stand-in (bench/baseline.py)"
    print(f"train_speed: batch {args.batch}, {args.height}x{args.width}, {args.tgt_len} tokens, "
          f"vocab {args.vocab}, {args.device}, {args.threads} threads, amp={args.amp}, "
          f"batch_norm={args.batch_norm}, "
          f"baseline={baseline_name}", flush=True)  # fmt: skip
    r_ours = run_side("bench.train_speed", "ours", argv)
    print(describe("ours", r_ours), flush=True)
    if "floor" in r_ours:
        print(describe_floor(r_ours["floor"], r_ours["wall_s"]), flush=True)
    r_base = run_side("bench.train_speed", "baseline", argv)
    print(describe("baseline", r_base), flush=True)
    cpu_ratio = r_base["cpu_s"] / r_ours["cpu_s"]
    print(f"  cpu-time ratio {cpu_ratio:.1f}x (less sensitive to a shared CPU)")
    print(f"train_speed: ours {r_ours['img_per_s']:.2f} img/s, baseline {r_base['img_per_s']:.2f}"
          f" img/s, {r_ours['img_per_s'] / r_base['img_per_s']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
