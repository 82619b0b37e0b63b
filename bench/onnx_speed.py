"""The shipped model through PyTorch and through ONNX Runtime, side by side, on the same images.

    python bench/onnx_speed.py --threads 2            # 200 validation formulas, rendered now
    onnx_speed: greedy latency torch 80 ms, onnx 40 ms (2.0x); ... identical greedy 100.0% ...

Validation formulas (../shared/data/im2latex100k/val.formulas.norm.txt; generated formulas
where that is absent) are rendered once and read as inference.py reads a PNG. Each backend
then runs alone in a fresh subprocess (the ONNX one with `import torch` made to fail, as a
torch-free deployment runs it), which measures on the same images, in this order:

  * single-image greedy latency: each of the first --latency images decoded alone, after
    --warmup untimed ones; the median and the 90th percentile;
  * throughput: all images decoded in batches of --batch (same-size images share a batch),
    greedy and beam --beam_size;
  * resident memory: after loading the model, the process's peak (ru_maxrss) after the
    single-image runs (what a process reading one image at a time needs) and at the end.

The predictions of both runs are compared: the share of images with identical tokens, greedy
and beam. `--onnx_dir` is the export to time (default: the shipped checkpoints/im2latex_onnx,
which tests/test_onnx.py holds to the shipped .pt).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/onnx_speed.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from im2latex.api import DEFAULT_ONNX_DIR  # torch-free: the ONNX side runs without torch

REPO = Path(__file__).resolve().parents[1]
VAL_FORMULAS = REPO.parent / "shared" / "data" / "im2latex100k" / "val.formulas.norm.txt"
SIDES = ("torch", "onnx")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="formulas rendered and decoded")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both backends")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput runs")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--latency", type=int, default=30, help="images timed one at a time")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model_path", type=Path, help="default: the shipped checkpoints/im2latex.pt")
    p.add_argument("--onnx_dir", type=Path, default=DEFAULT_ONNX_DIR)
    p.add_argument("--formulas", type=Path, default=VAL_FORMULAS)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set for the subprocesses
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)  # the parent's renders
    return p.parse_args(argv)


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_side(side: str, args: argparse.Namespace):
    """The side's `decode(images, beam_size, batch_size) -> [latex]`, model loaded."""
    if side == "onnx":
        from im2latex.onnx_backend import OnnxBackend

        backend = OnnxBackend(args.onnx_dir, threads=args.threads)
        return lambda imgs, beam, batch: [p.latex for p in backend.predict(
            imgs, beam_size=beam, max_len=150, batch_size=batch)]
    import torch

    from model.checkpoint import DEFAULT_MODEL, load_model
    from model.predict import predict

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model, vocab = load_model(args.model_path or DEFAULT_MODEL)
    return lambda imgs, beam, batch: [p.latex for p in predict(
        model, vocab, imgs, beam_size=beam, max_len=150, batch_size=batch)]


def child(args: argparse.Namespace) -> None:
    """One backend alone: print one JSON line of its timings, memory and predictions."""
    if args.side == "onnx":
        sys.modules["torch"] = None  # type: ignore[assignment]  # prove it runs without torch
    images = list(np.load(args.images).values())
    start = rss_mb()
    decode = load_side(args.side, args)
    loaded = rss_mb()
    for img in images[:args.warmup]:
        decode([img], 1, 1)
    latency = []
    for img in images[:args.latency]:
        t = time.perf_counter()
        decode([img], 1, 1)
        latency.append(time.perf_counter() - t)
    out = {"latency_s": latency, "rss_start_mb": start, "rss_loaded_mb": loaded,
           "peak_single_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for name, beam in (("greedy", 1), ("beam", args.beam_size)):
        t = time.perf_counter()
        out[name] = decode(images, beam, args.batch)
        out[f"{name}_img_per_s"] = len(images) / (time.perf_counter() - t)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out), flush=True)


def render_images(args: argparse.Namespace) -> tuple[list[np.ndarray], str]:
    """The formulas rendered and read as inference.py reads a PNG, and where they came from."""
    from data.generate import generate_formulas
    from data.image import ImageError, read_user_image
    from data.normalize import detokenize
    from data.render import render_formulas

    if args.formulas.is_file():
        lines = args.formulas.read_text(encoding="utf-8").splitlines()
        formulas, source = [f for f in lines if f.strip()][:args.n], str(args.formulas)
    else:
        formulas, source = generate_formulas(args.n, seed=0), "generated formulas"
    images = []
    for img in render_formulas([detokenize(f) for f in formulas]):
        try:
            images.append(read_user_image(img))
        except (ImageError, TypeError):  # TypeError: None, a formula that did not render
            continue
    return images, f"{len(images)} of the first {len(formulas)} of {source}"


def run_child(side: str, images: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.onnx_speed", *argv, "--side", side, "--images",
           str(images)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(r: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """The side-by-side lines and the summary line."""
    lines = []
    for side in SIDES:
        x = r[side]
        lat = sorted(x["latency_s"])
        x["latency_ms"] = 1000 * statistics.median(lat)
        p90 = 1000 * lat[min(len(lat) - 1, int(0.9 * len(lat)))]
        lines.append(f"  {side:5s}  greedy latency median {x['latency_ms']:6.1f} ms (p90 "
                     f"{p90:6.1f})  greedy {x['greedy_img_per_s']:6.2f} img/s  "
                     f"beam{args.beam_size} {x['beam_img_per_s']:6.2f} img/s  RSS: loaded "
                     f"{x['rss_loaded_mb']:4.0f} MB, peak single-image {x['peak_single_mb']:4.0f}"
                     f" MB, peak with batches {x['peak_rss_mb']:4.0f} MB")
    t, o = r["torch"], r["onnx"]
    same = {m: 100 * np.mean([a == b for a, b in zip(t[m], o[m])]) for m in ("greedy", "beam")}
    lines.append(
        f"onnx_speed: greedy latency torch {t['latency_ms']:.1f} ms, onnx {o['latency_ms']:.1f} "
        f"ms ({t['latency_ms'] / o['latency_ms']:.2f}x); throughput greedy "
        f"{o['greedy_img_per_s'] / t['greedy_img_per_s']:.2f}x, beam{args.beam_size} "
        f"{o['beam_img_per_s'] / t['beam_img_per_s']:.2f}x; peak RSS single-image torch "
        f"{t['peak_single_mb']:.0f} MB, onnx {o['peak_single_mb']:.0f} MB "
        f"({o['peak_single_mb'] / t['peak_single_mb']:.2f}), with batches "
        f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}; identical tokens greedy "
        f"{same['greedy']:.1f}%, beam {same['beam']:.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.side:
        child(args)
        return 0
    images, source = render_images(args)
    print(f"onnx_speed: {source}; {args.threads} threads, batch {args.batch}, beam "
          f"{args.beam_size}, latency over {args.latency} images; {os.cpu_count()} CPUs",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npz"
        np.savez(path, *images)
        argv = sys.argv[1:] if argv is None else argv
        r = {side: run_child(side, path, argv) for side in SIDES}
    print("\n".join(report(r, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
