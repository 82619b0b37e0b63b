"""Training-step speed under three allocators, side by side: glibc's malloc as it comes, glibc as
train.py sets it (`training.runtime.keep_freed_memory`), and jemalloc where it is installed.

    python bench/allocator.py [--procs 2] [--threads 1] [--cycles 1] [--jemalloc PATH]
    allocator: glibc X img/s (1.00x), glibc kept Y img/s (Y/X), jemalloc Z img/s (Z/X)

(measured: docs/results/allocator.txt, docs/performance.md)

Why a bench of its own: the cost is the kernel's, not the model's. glibc maps each buffer above
its mmap threshold afresh and unmaps it when freed, and a real run's batches change shape with
each length bucket, so the threshold never settles and every step faults its pages in again.
`bench/train_speed.py` repeats one shape and hides this; here each timed cycle is one step at
every other bucket size of bench/memory.py (IM2LATEX-100K's), with targets as long as the image is
wide. Each allocator runs in `--procs` subprocesses at once, as two training lanes share this
machine's two cores (the cost shows when both fault pages in together; one process alone hides
it too); the figures are the processes' summed images a second over the timed cycles, the
kernel's share of their CPU time and their minor page faults, read from getrusage.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/allocator.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian/Ubuntu libjemalloc2
# as stage 12's runs: purging thread, and freed pages kept rather than returned (no decay)
JEMALLOC_CONF = "background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def shapes() -> list[tuple[int, int, int]]:
    """(height, width, target length): every other bucket size of bench/memory.py, smallest to
    largest, with ~1 token per 3 px of width."""
    from bench.memory import SIZES

    return [(h, w, min(150, w // 3)) for (h, w), _ in SIZES[::2]]


def child(args: argparse.Namespace) -> dict:
    """One allocator: `--cycles` timed passes over every bucket shape after one untimed pass."""
    import torch
    import torch.nn.functional as F

    from bench.common import PAD
    from model import Im2Latex
    from model.checkpoint import config_from_checkpoint, load_checkpoint
    from training.runtime import keep_freed_memory

    if args.keep:
        assert keep_freed_memory(), "no glibc mallopt here"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config_from_checkpoint(load_checkpoint(args.model_path)["model_config"], args.model_path)
    model = Im2Latex(cfg)  # the shipped model's shape, which fine-tuning runs train
    model.train()
    opt = model.configure_optimizer(lr=1e-4)
    g, v = torch.Generator().manual_seed(1), cfg.vocab_size
    batches = [(torch.where(torch.rand(args.batch, 1, h, w, generator=g) < 0.15, 0, 255)
                .to(torch.uint8), torch.randint(4, v, (args.batch, n + 1), generator=g))
               for h, w, n in shapes()]  # fmt: skip

    def cycle() -> None:
        for imgs, tgt in batches:
            logits = model(imgs, tgt[:, :-1], teacher_forcing=1.0, amp=bool(args.amp))
            loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    cycle()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.cycles):
        cycle()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"img_per_s": args.cycles * len(batches) * args.batch / wall, "wall_s": wall,
            "sys_share": sys_ / (user + sys_), "minflt": r1.ru_minflt - r0.ru_minflt,
            "peak_rss_mb": r1.ru_maxrss / 1024}  # fmt: skip


def run(name: str, env: dict[str, str], argv: list[str], procs: int) -> dict:
    """`procs` copies of `python -m bench.allocator --child ...` at once, with `env` added, as
    parallel training lanes run; their JSON lines summed (img/s, faults) or maxed (RSS)."""
    cmd = [sys.executable, "-m", "bench.allocator", *argv, "--child"]
    children = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(procs)]  # fmt: skip
    results = []
    for c in children:
        out, err = c.communicate()
        if c.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"img_per_s": sum(r["img_per_s"] for r in results),
            "wall_s": max(r["wall_s"] for r in results),
            "sys_share": sum(r["sys_share"] for r in results) / procs,
            "minflt": sum(r["minflt"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--procs", type=int, default=2,
                   help="processes at once per allocator (default: two one-thread lanes)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model_path", default=str(REPO / "checkpoints" / "im2latex.pt"),
                   help="time a model of this checkpoint's shape (fresh weights)")
    p.add_argument("--cycles", type=int, default=1, help="timed passes over the bucket shapes")
    p.add_argument("--amp", type=int, default=-1,
                   help="bf16 encoder (0/1; default as train.py: 1 where the CPU has bf16)")
    p.add_argument("--jemalloc", default=JEMALLOC, help="libjemalloc.so to LD_PRELOAD, if there")
    p.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # in the child
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.amp < 0:
        from training.runtime import bf16_is_native

        args.amp = int(bf16_is_native("cpu"))
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    argv = [f"--{k}={getattr(args, k)}" for k in ("threads", "batch", "cycles", "amp")]
    argv.append(f"--model_path={Path(args.model_path).resolve()}")
    sides = [("glibc", {}, []), ("glibc kept", {}, ["--keep"])]
    if Path(args.jemalloc).is_file():
        sides.append(("jemalloc", {"LD_PRELOAD": args.jemalloc, "MALLOC_CONF": JEMALLOC_CONF}, []))
    else:
        print(f"allocator: no {args.jemalloc}; jemalloc left out (apt-get install libjemalloc2)")
    print(f"allocator: batch {args.batch}, {len(shapes())} bucket shapes x {args.cycles} cycles, "
          f"{args.procs} processes of {args.threads} threads, amp={args.amp}",
          flush=True)  # fmt: skip
    results = {}
    for name, env, extra in sides:
        r = results[name] = run(name, env, argv + extra, args.procs)
        print(f"  {name:11s} {r['img_per_s']:6.2f} img/s  wall {r['wall_s']:6.1f} s  "
              f"kernel {100 * r['sys_share']:4.1f}% of CPU  {r['minflt']:9d} minor faults  "
              f"peak RSS {r['peak_rss_mb']:5.0f} MB", flush=True)  # fmt: skip
    base = results["glibc"]["img_per_s"]
    print("allocator: " + ", ".join(f"{n} {r['img_per_s']:.2f} img/s ({r['img_per_s'] / base:.2f}x)"
                                    for n, r in results.items()))


if __name__ == "__main__":
    main()
