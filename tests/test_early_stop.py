"""Model selection and early stopping (train.py --select_by, --early_stop): best.pt is the epoch
of the best selected figure, a run whose figure stops improving ends by itself, a killed run
resumed stops at the same epoch with the same best.pt, and checkpoints saved before these flags
still resume.

The validation figures are scripted (train.py's validate replaced in-process) so that the loss and
the accuracy disagree, as they do once a small fine-tuning set is overfitted."""

import contextlib
import csv
import io
import math
import shutil
from pathlib import Path

import pytest
import torch

import train
import training.loop
import training.state
from model.checkpoint import load_checkpoint, save_checkpoint
from tests.test_train_state import Killed, _one_thread, log_rows, run  # noqa: F401 (fixture)

# the loss bottoms out at epoch 2, the accuracy peaks at epoch 3
LOSS = [2.0, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1]
ACC = [0.10, 0.20, 0.30, 0.25, 0.28, 0.29, 0.27, 0.26]
STOP = "no improvement in val_acc for 1 epochs: stopped after epoch 4; best epoch 3"


def scripted_validation(monkeypatch: pytest.MonkeyPatch, save_dir: Path | None = None) -> None:
    """validate() returns the figures of the next epoch: for a resumed run, the one after the
    epochs its last.pt has completed."""
    done = load_checkpoint(save_dir / "last.pt")["epoch"] if save_dir else 0
    calls = [done]

    def validate(*args, **kwargs) -> dict[str, float]:
        i = calls[0]
        calls[0] += 1
        return {"val_loss": LOSS[i], "val_ppl": math.exp(LOSS[i]), "val_acc": ACC[i]}

    monkeypatch.setattr(train, "validate", validate)


@pytest.fixture(scope="module")
def stopped(tiny_dataset, tmp_path_factory) -> tuple[Path, str]:
    """Selected by accuracy with --early_stop 1, uninterrupted; and what it printed."""
    save_dir = tmp_path_factory.mktemp("stopped")
    out = io.StringIO()  # capsys is per test: this run is shared by the module's tests
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        scripted_validation(mp)
        assert run(tiny_dataset, save_dir, "--epoches", "8", "--early_stop", "1",
                   "--save_every", "4") == 0
    return save_dir, out.getvalue()


@pytest.fixture(scope="module")
def by_loss(tiny_dataset, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("by_loss")
    with pytest.MonkeyPatch.context() as mp:
        scripted_validation(mp)
        assert run(tiny_dataset, save_dir, "--epoches", "3", "--select_by", "loss") == 0
    return save_dir


def test_best_pt_is_the_epoch_of_the_best_selected_figure(stopped, by_loss):
    rows = log_rows(stopped[0])
    assert max(rows, key=lambda r: float(r["val_acc"]))["epoch"] == "3"
    assert load_checkpoint(stopped[0] / "best.pt")["epoch"] == 3
    assert [r["best_epoch"] for r in rows] == ["1", "2", "3", "3"]
    assert load_checkpoint(by_loss / "best.pt")["epoch"] == 2  # the loss's best epoch
    assert load_checkpoint(by_loss / "last.pt")["args"]["select_by"] == "loss"


def test_a_run_that_stops_improving_ends_by_itself(stopped):
    save_dir, out = stopped
    assert STOP in out and "follow val_acc; stop after 1 epochs" in out
    last = load_checkpoint(save_dir / "last.pt")
    assert last["epoch"] == 4 and len(log_rows(save_dir)) == 4  # not the 8 asked for
    assert last["best"] == {"key": "val_acc", "value": 0.30, "epoch": 3}
    assert last["args"]["early_stop"] == 1 and last["args"]["select_by"] == "acc"


def killer(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Raise Killed at the first save of the 4th epoch (mid-epoch), or just before the log row
    of the epoch the run stops after (last.pt of that epoch written, the stop not yet made)."""
    save, write_log = training.state.save_checkpoint, training.loop.write_log

    def killed_save(state, path):
        if where == "mid-epoch" and state["epoch"] == 3 and state["step_in_epoch"]:
            raise Killed
        save(state, path)

    def killed_log(save_dir, row):
        if where == "log" and row["epoch"] == 4:
            raise Killed
        write_log(save_dir, row)

    monkeypatch.setattr(training.state, "save_checkpoint", killed_save)
    monkeypatch.setattr(training.loop, "write_log", killed_log)


@pytest.mark.parametrize("where", ["mid-epoch", "log"])
def test_a_killed_run_resumed_stops_where_an_uninterrupted_one_does(
        tiny_dataset, stopped, tmp_path, monkeypatch, capsys, where):
    with monkeypatch.context() as mp:
        scripted_validation(mp)
        killer(mp, where)
        with pytest.raises(Killed):
            run(tiny_dataset, tmp_path, "--epoches", "8", "--early_stop", "1",
                "--save_every", "4")
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == (3 if where == "mid-epoch" else 4)
    capsys.readouterr()
    scripted_validation(monkeypatch, tmp_path)  # the run's flags come from its checkpoint
    assert run(tiny_dataset, tmp_path, "--epoches", "8", "--from_check_point") == 0
    assert STOP in capsys.readouterr().out
    ref = stopped[0]
    assert log_rows(tmp_path) == log_rows(ref)
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(ref / name), load_checkpoint(tmp_path / name)
        assert (a["epoch"], a["step"], a["best"]) == (b["epoch"], b["step"], b["best"]), name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_a_checkpoint_from_before_the_flags_resumes_selected_by_loss(
        tiny_dataset, by_loss, tmp_path, monkeypatch, capsys):
    """Without the new keys (as saved by older versions: args without select_by and
    early_stop, no best, a log without best_epoch) the run resumes selected by the loss, and
    the epochs since its best are counted from log.csv."""
    shutil.copytree(by_loss, tmp_path, dirs_exist_ok=True)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    del ckpt["best"], ckpt["args"]["select_by"], ckpt["args"]["early_stop"]
    del ckpt["epoch_end"]["row"]["best_epoch"]
    save_checkpoint(ckpt, tmp_path / "last.pt")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    with open(tmp_path / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [k for k in rows[0] if k != "best_epoch"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    scripted_validation(monkeypatch, tmp_path)
    assert run(tiny_dataset, tmp_path, "--epoches", "8", "--from_check_point",
               "--early_stop", "1") == 0
    out = capsys.readouterr().out
    assert "follow val_loss" in out and "best val_loss; from log.csv: 1.5 at epoch 2" in out
    assert "no improvement in val_loss for 1 epochs: stopped after epoch 3; best epoch 2" in out
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
