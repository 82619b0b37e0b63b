"""The run's log: one row of figures per epoch in `log.csv`, and `curves.png` drawn from it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from model.checkpoint import atomic_write

LOG, CURVES = "log.csv", "curves.png"


def read_log(save_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of the run's log.csv (none when there is no log yet)."""
    path = save_dir / LOG
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_log(save_dir: Path, row: dict) -> None:
    """Record the epoch's figures in log.csv, replacing a row of the same epoch, and redraw
    curves.png from the whole file. The file is rewritten atomically, so a kill leaves whole
    rows only."""
    fields, rows = read_log(save_dir)
    # a run resumed by a newer version keeps the columns its log started with
    fields = fields or list(row)
    rows = [r for r in rows if r.get("epoch") != str(row["epoch"])] + [row]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(save_dir / LOG, lambda f: f.write(text.getvalue().encode()))
    plot_log(save_dir)


def plot_log(save_dir: Path) -> None:
    """Loss curves and validation accuracy by epoch; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_log(save_dir)[1]
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [float(r["train_loss"]) for r in rows], "o-", label="train")
    a.plot(ep, [float(r["val_loss"]) for r in rows], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [float(r["val_acc"]) for r in rows], "o-", color="C2")
    b.set_xlabel("epoch"), b.set_ylabel("validation token accuracy"), b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(save_dir / CURVES, dpi=100)
    plt.close(fig)
