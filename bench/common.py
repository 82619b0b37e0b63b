"""Shared parts of the speed benchmarks: arguments, the two models, inputs, per-side subprocesses.

Every measured side (ours / baseline, and each decoding mode) runs in its own subprocess, so that
its peak resident memory (ru_maxrss) is its own and one side's allocator state or thread pool
cannot slow the other.  Both sides build the same weights: ours is initialised from the seed, and
the baseline gets a copy (`copy_weights`), so decoding follows the same hypotheses on both sides.
"""

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from bench.baseline import BaselineIm2Latex, copy_weights
from bench.floor import step_floor
from model import Im2Latex, ModelConfig
from training.runtime import bf16_is_native, use_tf32_on_cuda

REPO = Path(__file__).resolve().parents[1]

PAD, BOS, EOS = 0, 1, 2  # docs/design.md: <pad> <s> </s> <unk> come first


def parser(description: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on each side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--steps", type=int, default=steps, help="timed repetitions per side")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    p.add_argument("--amp", type=int, default=-1,
                   help="ours: bf16 autocast for the CNN (0/1; default: 1 where the device has "
                        "bf16, as train.py --amp auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--baseline_repo",
        default=None,
        help="a luopeixiang/im2latex checkout: time its Im2LatexModel, not the stand-in",
    )
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # set for the subprocesses
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.amp < 0:
        args.amp = int(bf16_is_native(args.device))
    return args


def build_models(
    args: argparse.Namespace, batch_norm: bool = False
) -> tuple[Im2Latex, torch.nn.Module]:
    """The full-size model (emb 80, hidden 512, enc 512) and the baseline with the same weights.

    Ours is built without the encoder's batch norm unless asked, so that both compute the same
    function and decode the same hypotheses; with it (training speed of the default model) the
    baseline keeps its own initial weights."""
    torch.manual_seed(args.seed)
    ours = Im2Latex(ModelConfig(vocab_size=args.vocab, batch_norm=batch_norm))
    if args.baseline_repo:
        cls = load_reference(args.baseline_repo)
    else:
        cls = BaselineIm2Latex
    theirs = cls(args.vocab, 80, 512, enc_out_dim=512, add_pos_feat=False, dropout=0.0)
    if not batch_norm:
        copy_weights(ours, theirs)
    return ours.to(args.device), theirs.to(args.device)


def load_reference(repo: str) -> type:
    """Their `model/model.py` `Im2LatexModel`, imported under another package name (ours is
    also called `model`) and without running their `model/__init__.py`."""
    pkg = types.ModuleType("_luopeixiang_model")
    pkg.__path__ = [os.path.join(repo, "model")]
    sys.modules[pkg.__name__] = pkg
    return importlib.import_module("_luopeixiang_model.model").Im2LatexModel


def images(args: argparse.Namespace) -> torch.Tensor:
    """B x 1 x H x W uint8: white page with random dark strokes (content does not matter)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    imgs = torch.full((args.batch, 1, args.height, args.width), 255, dtype=torch.uint8)
    ink = torch.rand(imgs.shape, generator=g) < 0.15
    return imgs.masked_fill(ink, 0).to(args.device)


def time_side(run: Callable[[], object], args: argparse.Namespace) -> dict:
    """Run `run` warmup + steps times.  Reports the best repetition (on a shared CPU other
    processes only ever add time), the median, CPU seconds of the best one, and this process's
    peak RSS."""
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # time the work, not its launch
    for _ in range(args.warmup):
        run()
    sync()
    walls, cpus = [], []
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    best = min(range(len(walls)), key=walls.__getitem__)
    return {
        "wall_s": walls[best],
        "median_wall_s": statistics.median(walls),
        "cpu_s": cpus[best],
        "img_per_s": args.batch / walls[best],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def child_main(args: argparse.Namespace, sides: dict[str, Callable],
               counted: Collection[str] = ()) -> None:
    """In a subprocess: set threads, build the side's closure, time it, print one JSON line.
    Sides in `counted` also get their arithmetic floor (bench/floor.py), after the timing."""
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if torch.device(args.device).type == "cuda":
        use_tf32_on_cuda()  # as train.py, for both sides
    run = sides[args.side](args)
    result = time_side(run, args)
    if args.side in counted:
        result["floor"] = step_floor(run, args.device)
    print(json.dumps(result), flush=True)


def run_side(module: str, side: str, argv: list[str]) -> dict:
    """Run `python -m module --side side ...` and return its JSON result."""
    cmd = [sys.executable, "-m", module, *argv, "--side", side]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(name: str, r: dict) -> str:
    return (f"  {name:16s} {r['img_per_s']:7.2f} img/s  best {r['wall_s']:6.2f} s/batch "
            f"(median {r['median_wall_s']:6.2f}, cpu {r['cpu_s']:6.2f})  "
            f"peak RSS {r['peak_rss_mb']:5.0f} MB"
            + (f", GPU {r['gpu_peak_mb']:6.0f} MB" if r.get("gpu_peak_mb") else ""))  # fmt: skip
