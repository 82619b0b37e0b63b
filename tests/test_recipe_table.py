"""bench/recipe_table.py: its rows are train.py's validation figures and evaluate.py's scores of
the same checkpoint, not figures of its own making."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import HAVE_TEX, run_script

pytestmark = pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and ghostscript")


def test_rows_agree_with_train_and_evaluate(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "table.json"
    proc = run_script("bench/recipe_table.py", "--data_path", tiny_dataset, "--n", "5",
                      "--json", out, tiny_model, tiny_model)
    row, again = json.loads(out.read_text())
    # the second row is compared with the first by a paired bootstrap: the same weights read
    # the same images the same way, so they differ by exactly nothing
    assert (again["vs_first_diff"], again["vs_first_sd"]) == (0.0, 0.0)
    assert proc.stdout.count(str(tiny_model)[-44:]) == 2 and "+0.00" in proc.stdout
    # train.py validated the same weights at the end of its one epoch (under bf16 autocast
    # where the CPU has it, hence the tolerance; the table runs in fp32)
    with open(tiny_model.parent / "log.csv") as fh:
        logged = list(csv.DictReader(fh))[-1]
    assert row["val_loss"] == pytest.approx(float(logged["val_loss"]), rel=0.02)
    assert row["val_acc"] == pytest.approx(float(logged["val_acc"]), abs=0.02)
    metrics = tmp_path / "eval.json"
    run_script("evaluate.py", "--model_path", tiny_model, "--data_path", tiny_dataset,
               "--split", "validate", "--limit", "5", "--beam_size", "1", "--quiet",
               "--metrics_path", metrics)
    scores = json.loads(metrics.read_text())
    assert (row["bleu4"], row["exact_match"], row["n"], row["bleu4_folded"]) == (
        scores["bleu4"], scores["exact_match"], 5, scores["bleu4_folded"])


def test_a_missing_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    proc = run_script("bench/recipe_table.py", "--data_path", tiny_dataset,
                      tmp_path / "nope.pt", check=False)
    assert proc.returncode != 0
    assert "nope.pt" in proc.stderr and "Traceback" not in proc.stderr

