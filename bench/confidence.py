"""How well does a reading's score tell right readings from wrong ones, and what is the chance
that a reading of a given score is exactly right? Measures it on validation formulas and writes
the shipped model's calibration (im2latex/confidence.py reads it).

Rerun whenever the shipped model changes (one command; 13 minutes on one CPU thread of a busy
machine for the default 400 formulas x 4 conditions x 2 decoders):

    python bench/confidence.py --report docs/results/confidence.txt

Develop with e.g. `--n 20 --conditions clean`. Formulas are the first N IM2LATEX-100K
VALIDATION formulas (never test), read as users' files are (bench/robustness.py's rows: image
file bytes -> read_user_image -> model): clean renders, screenshot-like and other-style
conditions and the other pipeline's images, so the figure is calibrated on the inputs users
bring. Each is decoded greedily and with beam 5 (the web page's default). A reading is right
when its tokens equal the reference's (data/metrics.py's exact match); images that
normalization refuses get no reading and are left out.

Printed: per decoder, the AUROC of each candidate feature (the score, and the minimum token
log-probability, length and sum the decoders do not report today, from rescoring the reading),
the exact rate of the top half by score, then each calibration method (isotonic, Platt) fitted
on one half of the formulas and judged on the other (Brier score, ECE, reliability table) next
to today's exp(score). The method with the lower held-out Brier score is refitted on all
readings and written next to the checkpoint with its sha256 (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import isotonic_regression, minimize
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import robustness  # noqa: E402
from data.render import RenderError  # noqa: E402
from data.vocab import Vocab  # noqa: E402
from im2latex.api import Reader, TorchBackend  # noqa: E402
from im2latex.confidence import (  # noqa: E402
    Calibration,
    Curve,
    calibration_path,
    decoder_name,
)
from im2latex.decoding import MAX_LEN  # noqa: E402
from model.checkpoint import (  # noqa: E402
    DEFAULT_MODEL,
    atomic_write,
    content_digest,
    load_checkpoint,
    model_from_checkpoint,
)
from model.im2latex import Im2Latex  # noqa: E402

CONDITIONS = ["clean", "screenshot", "style:times", robustness.VAL_IMAGES]
FEATURES = ["mean_logprob", "min_logprob", "sum_logprob", "neg_length"]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="validation formulas per condition")
    p.add_argument("--conditions", nargs="+", default=CONDITIONS, metavar="NAME",
                   help="rows of bench/robustness.py to read")
    p.add_argument("--beam_sizes", type=int, nargs="+", default=[5, 1],
                   help="one calibration curve per decoder: 1 greedy, wider beam search")
    p.add_argument("--model_path", default=str(DEFAULT_MODEL), help="checkpoint (.pt)")
    p.add_argument("--calibration", type=Path,
                   help="where to write the calibration (default: beside the checkpoint)")
    p.add_argument("--report", type=Path, help="also write the printed report here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seeds every random condition")
    p.add_argument("--val_images", type=Path, default=robustness.DATA / "val_images")
    p.add_argument("--val_matching", type=Path, default=robustness.DATA / "val.matching.txt")
    p.add_argument("--val_formulas", type=Path,
                   default=robustness.DATA / "val.formulas.norm.txt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.n < 1 or args.threads < 1 or any(b < 1 for b in args.beam_sizes):
        p.error("--n, --threads and --beam_sizes must be at least 1")
    if len({decoder_name(b) for b in args.beam_sizes}) != len(args.beam_sizes):
        p.error("--beam_sizes: one greedy (1) and one beam search size at most")
    # what bench/robustness.py's row builders read: validation formulas only
    args.split, args.formulas, args.examples, args.device = "val", None, None, "cpu"
    args.calibration = args.calibration or calibration_path(args.model_path)
    return args


@dataclass
class Readings:
    """One decoder's readings of every image that reached the model, with their features."""

    condition: list[str]
    half: np.ndarray  # 0/1 by formula: a formula's images all fall in the same half
    correct: np.ndarray  # bool, token-for-token equal to the reference
    features: dict[str, np.ndarray]


def build_rows(args: argparse.Namespace) -> list[robustness.Row]:
    names = robustness.check_conditions(args.conditions)
    rendered = [n for n in names if n != robustness.VAL_IMAGES]
    formulas = robustness.read_formulas(args) if rendered else []
    rows = robustness.rendered_rows(rendered, formulas, args.seed, args.quiet, None)
    if robustness.VAL_IMAGES in names:
        rows.append(robustness.val_images_row(args))
    return rows


@torch.inference_mode()
def token_logprobs(model: Im2Latex, vocab: Vocab, images: list[np.ndarray],
                   readings: list[str], max_len: int) -> list[np.ndarray]:
    """Each reading's per-token log-probabilities (</s> included unless the decoder stopped at
    max_len without it, as its score does), by teacher-forcing the reading back through the
    decoder: the decoders return only the mean, and this is how we learn whether the minimum or
    the length would rank readings better (measurement only)."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_shape[img.shape].append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(images)
    for idx in by_shape.values():
        for k in range(0, len(idx), 16):
            chunk = idx[k:k + 16]
            ids = [vocab.encode(readings[i]) for i in chunk]
            ids = [seq + [vocab.eos_id] if len(seq) < max_len else seq for seq in ids]
            width = max(map(len, ids))
            tgt = torch.full((len(chunk), width + 1), vocab.pad_id, dtype=torch.long)
            for j, seq in enumerate(ids):
                tgt[j, 0], tgt[j, 1:len(seq) + 1] = vocab.bos_id, torch.tensor(seq)
            imgs = torch.from_numpy(np.stack([images[i] for i in chunk]))[:, None]
            logp = torch.log_softmax(model(imgs, tgt[:, :-1]), dim=-1)  # B x T x V
            picked = logp.gather(2, tgt[:, 1:, None]).squeeze(2)  # B x T
            for j, i in enumerate(chunk):
                out[i] = picked[j, :len(ids[j])].numpy().astype(float)
    return out


def read_all(rows: list[robustness.Row], model: Im2Latex, vocab: Vocab, beam_size: int,
             args: argparse.Namespace) -> Readings:
    """Decode every usable image of every row with one decoder, as im2latex.Reader does (an
    image with two readings gives the one the Reader keeps), and collect its features."""
    kept = [(row.name, img, ref) for row in rows for img, ref in zip(row.images, row.refs)
            if img is not None]
    reader = Reader(backend=TorchBackend(model, vocab), beam_size=beam_size,
                    max_len=args.max_len, batch_size=args.batch_size)
    t0 = time.perf_counter()
    preds = reader.decode([img for _, img, _ in kept])
    images = [img[p.reading] for (_, img, _), p in zip(kept, preds)]  # the reading kept
    print(f"# beam {beam_size}: {len(images)} images decoded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    per_token = token_logprobs(model, vocab, images, [p.latex for p in preds], args.max_len)
    score = np.array([p.score for p in preds])
    drift = max((abs(t.mean() - s) for t, s in zip(per_token, score)), default=0.0)
    if drift > 1e-3:  # the rescoring must see what the decoder saw
        print(f"# warning: rescored mean differs from the decoder's score by up to {drift:.4f}")
    return Readings(
        condition=[name for name, _, _ in kept],
        half=np.array([zlib.crc32(ref.encode()) % 2 for _, _, ref in kept]),
        correct=np.array([p.latex.split() == ref.split() for p, (_, _, ref) in zip(preds, kept)]),
        features={"mean_logprob": score,
                  "min_logprob": np.array([t.min() for t in per_token]),
                  "sum_logprob": np.array([t.sum() for t in per_token]),
                  "neg_length": -np.array([len(t) for t in per_token], dtype=float)})


# ---------------------------------------------------------------------------- measures and fits


def auroc(score: np.ndarray, correct: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random right reading scores above a random
    wrong one (ties count half), from the rank-sum (Mann-Whitney U) identity."""
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # ties get their mean rank
    return float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_half_exact(score: np.ndarray, correct: np.ndarray) -> float:
    """Exact rate of the half of the readings with the highest scores."""
    order = np.argsort(-score, kind="stable")
    return float(correct[order[:max(1, len(score) // 2)]].mean())


def fit_isotonic(score: np.ndarray, correct: np.ndarray) -> Curve:
    """Pool-adjacent-violators on the readings sorted by score, one knot per pooled block at
    its mean score. Each block's rate is shrunk by one right and one wrong pseudo-reading
    (Laplace), so a small block at either end claims neither 0 % nor 100 %; a second pass keeps
    the shrunk rates monotone."""
    order = np.argsort(score, kind="stable")
    s, y = score[order], correct[order].astype(float)
    uniq, start, count = np.unique(s, return_index=True, return_counts=True)
    hits = np.add.reduceat(y, start)
    fit = isotonic_regression(hits / count, weights=count)
    blocks = fit.blocks  # block starts, then len(uniq)
    knots, rates, sizes = [], [], []
    for a, b in zip(blocks[:-1], blocks[1:]):
        n = count[a:b].sum()
        knots.append(float((uniq[a:b] * count[a:b]).sum() / n))
        rates.append((hits[a:b].sum() + 1) / (n + 2))
        sizes.append(n)
    smooth = isotonic_regression(np.array(rates), weights=np.array(sizes, dtype=float)).x
    return Curve(np.array(knots), np.clip(smooth, 0.0, 1.0))


def fit_logistic(x: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression of rightness on the columns of x (N x F), standardized first:
    returns (weights F+1, intercept first; and the standardization, mean and sd per column)."""
    y = correct.astype(float)
    mu, sd = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    z = np.column_stack([np.ones(len(x)), (x - mu) / sd])

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        t = z @ w
        return float(np.mean(np.logaddexp(0, t) - y * t)), z.T @ (1 / (1 + np.exp(-t)) - y) / len(y)

    w = minimize(loss, np.zeros(z.shape[1]), jac=True, method="BFGS").x
    return w, np.stack([mu, sd])


def logistic(x: np.ndarray, w: np.ndarray, norm: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(w[0] + ((x - norm[0]) / norm[1]) @ w[1:])))


def fit_platt(score: np.ndarray, correct: np.ndarray, knots: int = 64) -> Curve:
    """Logistic regression of rightness on the score (Platt scaling), stored as the sigmoid
    sampled at `knots` points over the scores seen (flat beyond: no extrapolation)."""
    w, norm = fit_logistic(score[:, None], correct)
    grid = np.linspace(score.min(), score.max(), knots) if np.ptp(score) > 0 else score[:1]
    p = logistic(grid[:, None], w, norm)
    return Curve(grid, np.maximum.accumulate(p))  # monotone even if the slope came out < 0


FITS = {"isotonic": fit_isotonic, "platt": fit_platt}


def reliability(prob: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[tuple]:
    """Equal-count bins of the predicted probability: (low, high, n, mean predicted, observed
    rate). Equal counts, not equal widths, since most readings sit in a narrow range."""
    order = np.argsort(prob, kind="stable")
    return [(prob[b].min(), prob[b].max(), len(b), prob[b].mean(), correct[b].mean())
            for b in np.array_split(order, min(bins, len(prob))) if len(b)]


def ece(prob: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |observed - predicted| over bins."""
    return float(sum(n * abs(obs - pred) for _, _, n, pred, obs in
                     reliability(prob, correct, bins)) / len(prob))


def brier(prob: np.ndarray, correct: np.ndarray) -> float:
    return float(np.mean((prob - correct) ** 2))


# ---------------------------------------------------------------------------------- the report


def feature_table(r: Readings) -> list[str]:
    """AUROC of each feature over all readings and per condition, plus the logistic blend of
    all of them fitted on half 0 and judged on half 1 (does a richer feature pay?)."""
    conds = list(dict.fromkeys(r.condition))
    cond = np.array(r.condition)
    lines = [f"  {'AUROC':<14} {'all':>6} " + " ".join(f"{c[:12]:>12}" for c in conds)]
    for name in FEATURES:
        f = r.features[name]
        per = [auroc(f[cond == c], r.correct[cond == c]) for c in conds]
        lines.append(f"  {name:<14} {auroc(f, r.correct):6.3f} "
                     + " ".join(f"{v:12.3f}" for v in per))
    x = np.column_stack([r.features[n] for n in FEATURES])
    fit, held = r.half == 0, r.half == 1
    if r.correct[fit].any() and not r.correct[fit].all():
        w, norm = fit_logistic(x[fit], r.correct[fit])
        blend = logistic(x[held], w, norm)
        lines.append(f"  {'blend of all':<14} {auroc(blend, r.correct[held]):6.3f}  (logistic "
                     "fitted on half 0, judged on half 1; mean_logprob on half 1: "
                     f"{auroc(r.features['mean_logprob'][held], r.correct[held]):.3f})")
    return lines


def calibration_table(r: Readings) -> tuple[list[str], str, dict]:
    """Each method fitted on half 0, judged on half 1 against today's exp(score); returns the
    lines, the method with the lower held-out Brier score, and its held-out figures."""
    score, fit, held = r.features["mean_logprob"], r.half == 0, r.half == 1
    judged = {"exp(score)": np.exp(score[held])}
    for name, fitter in FITS.items():
        judged[name] = fitter(score[fit], r.correct[fit])(score[held])
    y = r.correct[held]
    lines = [f"  held out: {held.sum()} readings of half 1 ({y.mean():.1%} right), curves fitted "
             f"on {fit.sum()} of half 0"]
    lines += [f"  {name:<12} Brier {brier(p, y):.4f}  ECE {ece(p, y):.4f}"
              for name, p in judged.items()]
    best = min(FITS, key=lambda n: brier(judged[n], y))
    lines.append(f"  reliability on half 1 (10 equal-count bins), {best} | exp(score):")
    lines.append(f"    {'predicted':>15} {'n':>5} {'mean':>6} {'right':>6} | "
                 f"{'exp(score)':>15} {'mean':>6} {'right':>6}")
    for a, b in zip(reliability(judged[best], y), reliability(judged["exp(score)"], y)):
        lines.append(f"    {a[0]:6.1%}..{a[1]:6.1%} {a[2]:5d} {a[3]:6.1%} {a[4]:6.1%} | "
                     f"{b[0]:6.1%}..{b[1]:6.1%} {b[3]:6.1%} {b[4]:6.1%}")
    figures = {"method": best, "brier": round(brier(judged[best], y), 4),
               "ece": round(ece(judged[best], y), 4),
               "ece_exp_score": round(ece(judged["exp(score)"], y), 4)}
    return lines, best, figures


def report(r: Readings, beam_size: int) -> tuple[list[str], Curve, dict]:
    """One decoder's section of the report, its curve fitted on all readings, and its figures."""
    score = r.features["mean_logprob"]
    conds = list(dict.fromkeys(r.condition))
    cond = np.array(r.condition)
    lines = [f"== beam {beam_size} ({decoder_name(beam_size)} curve): {len(score)} readings, "
             f"{r.correct.mean():.1%} exactly right",
             "  right by condition: " + ", ".join(f"{c} {r.correct[cond == c].mean():.1%}"
                                                  for c in conds)]
    lines += feature_table(r)
    figures = {"readings": len(score), "exact_rate": round(float(r.correct.mean()), 4),
               "auroc": round(auroc(score, r.correct), 4),
               "top_half_exact_rate": round(top_half_exact(score, r.correct), 4)}
    lines.append(f"  exact rate of the top 50% by score: {figures['top_half_exact_rate']:.1%} "
                 f"(all: {figures['exact_rate']:.1%}; AUROC of the score {figures['auroc']:.3f})")
    cal_lines, method, held = calibration_table(r)
    lines += cal_lines
    figures["held_out"] = held
    curve = FITS[method](score, r.correct)
    lines.append(f"  shipped: {method} on all {len(score)} readings, {len(curve.score)} knots, "
                 f"{curve.probability[0]:.1%} at score <= {curve.score[0]:.3f} to "
                 f"{curve.probability[-1]:.1%} at score >= {curve.score[-1]:.3f}")
    return lines, curve, figures


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    try:
        ckpt = load_checkpoint(args.model_path)
        digest = content_digest(ckpt)  # equals the stored sha256, which load_checkpoint checked
        model, vocab = model_from_checkpoint(ckpt, source=args.model_path)
        rows = build_rows(args)
    except (ValueError, RenderError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    head = [f"# python bench/confidence.py {' '.join(argv if argv is not None else sys.argv[1:])}",
            f"# model {args.model_path} (sha256 {digest[:16]}...), first {args.n} VALIDATION "
            f"formulas, conditions {' '.join(args.conditions)}, seed {args.seed}",
            f"# {args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f} at the start "
            "(the figures do not depend on it, only the time taken)"]
    head += [f"# {row.name}: {sum(i is None for i in row.images)} of {len(row.images)} images "
             "refused by normalization (no reading, left out)" for row in rows
             if any(i is None for i in row.images)]
    print("\n".join(head), flush=True)
    lines, curves, measured = list(head), {}, {}
    for beam in args.beam_sizes:
        section, curve, figures = report(read_all(rows, model, vocab, beam, args), beam)
        print("\n".join(section), flush=True)
        lines += section
        curves[decoder_name(beam)] = curve
        measured[decoder_name(beam)] = {"beam_size": beam, **figures}
    cal = Calibration(digest, curves, {
        "split": "val", "n": args.n, "conditions": args.conditions, "seed": args.seed,
        "when": time.strftime("%Y-%m-%d"), "decoders": measured})
    text = json.dumps(cal.to_dict(), indent=1) + "\n"
    atomic_write(args.calibration, lambda f: f.write(text.encode()))
    lines.append(f"# wrote {args.calibration} ({time.time() - started:.0f} s in all)")
    print(lines[-1])
    if args.report:
        atomic_write(args.report, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
