"""Shared fixtures: a tiny rendered dataset and a tiny trained model, made once per session.

Everything is generated on the fly (the built-in formula generator and the renderer), so the
suite needs nothing but the repository and TeX."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
HAVE_TEX = shutil.which("pdflatex") is not None and shutil.which("gs") is not None
TINY_MODEL = ["--emb_dim", "16", "--dec_rnn_h", "32", "--enc_out_dim", "32",
              "--cnn_widths", "8", "8", "16", "16", "--add_position_features"]


def run_script(script: str, *args: str, check: bool = True, timeout: float = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts the way a user does, from the shell."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """~120 generated formulas rendered into the standard layout, sharded, with a vocab."""
    d = tmp_path_factory.mktemp("tiny_data")
    run_script("preprocess.py", "--generate", "120", "--data_path", d, "--quiet",
               "--split_ratio", "0.7", "0.15", "0.15", "--seed", "3")
    run_script("build_vocab.py", "--data_path", d)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny model trained for one short epoch: enough to exercise every script."""
    run = tmp_path_factory.mktemp("tiny_run")
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", run, *TINY_MODEL,
               "--batch_size", "16", "--epoches", "1", "--workers", "0", "--quiet",
               "--threads", "1")
    return run / "best.pt"
