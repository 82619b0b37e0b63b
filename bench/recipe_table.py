r"""The recipe table of issue 13: checkpoints of short training runs side by side, on validation.

    python bench/recipe_table.py --data_path FULL runs/a/last.pt runs/b/last.pt ...

Each row is one checkpoint, with two figures that answer different questions:
- teacher-forced loss and token accuracy over the WHOLE validation split (train.py's own
  validation): the low-noise figure, 8K images, but not what a user sees;
- greedy BLEU-4 / exact match on a fixed subset, the first --n validation images (evaluate.py
  --limit N --beam_size 1): what a user sees, but noisy. So each row after the first also
  gets its BLEU difference from the first row with a paired bootstrap over those images
  (data/metrics.py): its standard deviation and 95% interval say whether the difference is a
  ranking or noise.
- the same BLEU-4 with both sides in one spelling of fonts, primes and arrows ("folded",
  evaluate.py's figure from data/metrics.py folded_scores): `\mathcal { L }` and `{ \cal L }`
  typeset the same image, so the gap between the two BLEU columns is what a row loses to
  spelling rather than to reading.
A model whose vocabulary lacks some validation tokens reads them as <unk> (wrong for it): that
is the cost of its vocabulary, and evaluate.py prints how many references are affected.
Validation only: recipes are chosen here, never on test formulas.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/recipe_table.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.files import atomic_write
from data.layout import MAX_TRAIN_TOKENS
from data.metrics import paired_bootstrap
from model.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.distributed import Dist
from training.loop import validate

REPO = Path(__file__).resolve().parents[1]


def teacher_forced(path: str, data_path: Path, batch_size: int) -> dict[str, float]:
    """train.py's validation figures for the checkpoint at `path` (fp32 on the CPU)."""
    model, vocab = model_from_checkpoint(load_checkpoint(path), source=path)
    val = FormulaDataset(data_path / "shards" / "validate", vocab, max_len=MAX_TRAIN_TOKENS)
    loader = DataLoader(val, collate_fn=collate, batch_sampler=BucketBatchSampler(
        val.bucket_items, batch_size, shuffle=False, lengths=val.lengths))
    return validate(model, loader, Dist("cpu"), amp=False, pad=vocab.pad_id)


def greedy_subset(path: str, data_path: Path, n: int, threads: int) -> dict:
    """evaluate.py's scores on the first `n` validation images, greedy, as a user would run it,
    with its reference and predicted lines (`refs`, `hyps`) for the bootstrap."""
    with tempfile.TemporaryDirectory() as tmp:
        out, ref, hyp = (Path(tmp) / f for f in ("metrics.json", "ref.txt", "result.txt"))
        cmd = [sys.executable, str(REPO / "evaluate.py"), "--model_path", path,
               "--data_path", str(data_path), "--split", "validate", "--limit", str(n),
               "--beam_size", "1", "--threads", str(threads), "--quiet", "--metrics_path", str(out),
               "--ref_path", str(ref), "--result_path", str(hyp)]
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not out.is_file():
            sys.exit(f"evaluate.py failed on {path}:\n{run.stderr}")
        return {**json.loads(out.read_text()), "refs": ref.read_text().split("\n")[:n],
                "hyps": hyp.read_text().split("\n")[:n]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (.pt) or run folders")
    p.add_argument("--data_path", type=Path, required=True, help="dataset with shards/validate")
    p.add_argument("--n", type=int, default=500, help="validation images decoded greedily")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples of each row's BLEU difference from the first")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'checkpoint':44s} {'val loss':>8s} {'val acc':>8s} {'BLEU-4':>7s} {'exact':>6s}"
          f" {'folded':>6s}  {'BLEU-4 vs first row: diff, sd, 95% interval':s}\n(loss/acc: all "
          f"validation images; BLEU/exact: first {args.n}, greedy; folded: BLEU-4 with both "
          f"sides in one spelling, data/spelling.py; {args.bootstrap} paired resamples)")
    rows, first = [], None
    for path in args.checkpoints:
        try:
            tf = teacher_forced(path, args.data_path, args.batch_size)
        except (CheckpointError, OSError) as e:  # a bad row ends the table with its reason
            sys.exit(f"recipe_table: {e}")
        g = greedy_subset(path, args.data_path, args.n, args.threads)
        first = first or g
        boot = paired_bootstrap(g["refs"], first["hyps"], g["hyps"], args.bootstrap)
        folded = g["bleu4_folded"]
        rows.append({"checkpoint": path, **tf, "bleu4": g["bleu4"], "bleu4_folded": folded,
                     "exact_match": g["exact_match"], "n": args.n,
                     **{f"vs_first_{k}": v for k, v in boot.items()}})
        versus = (f"  {boot['diff']:+6.2f}  {boot['sd']:4.2f}  [{boot['low']:+.2f}, "
                  f"{boot['high']:+.2f}]" if g is not first else "")
        print(f"{path[-44:]:44s} {tf['val_loss']:8.4f} {100 * tf['val_acc']:7.2f}% "
              f"{g['bleu4']:7.2f} {g['exact_match']:5.1f}% {folded:6.2f}{versus}", flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
