"""Learning-rate schedules (training/schedule.py) and label smoothing: the rate curves on the real
scheduler objects, exact resume of a per-step schedule, old checkpoints resuming as plateau, a
fixed schedule per run, and a smoothed training loss beside a plain validation loss."""

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.selection import Selection
from tests.conftest import TINY_MODEL, run_script
from tests.test_train import same_weights
from training import RunError
from training.config import TrainConfig, parse_args
from training.schedule import make_schedule

COMMON = [*TINY_MODEL, "--batch_size", "8", "--workers", "0", "--quiet", "--threads", "1",
          "--dropout", "0.2"]
SEL = Selection.from_choice("acc", 0, True)


def lr_curve(steps: int, **options) -> tuple[list[float], torch.optim.Optimizer]:
    """The rate of each of `steps` optimizer steps under make_schedule's scheduler (+ the one
    after), and the optimizer."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=options.get("lr", 1e-3))
    cfg = TrainConfig(data_path=Path("."), save_dir=Path("."), **options)
    _, schedule = make_schedule(optimizer, cfg, SEL, steps_per_epoch=5, log=lambda _: None)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(3)
        optimizer.step()
        schedule.optimizer_stepped()
    return lrs, optimizer


def test_cosine_warms_up_to_lr_then_decays_monotonically_to_min_lr():
    lrs, _ = lr_curve(16, schedule="cosine", warmup_steps=4, schedule_steps=12, lr=1e-3,
                      min_lr=1e-5)
    assert 0 < lrs[0] < 3e-4  # ~0, but no wasted step at rate 0
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))
    assert lrs[4] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13]))
    assert lrs[12:] == pytest.approx([1e-5] * 5)  # --min_lr at the horizon and after it


def test_the_horizon_defaults_to_the_epochs_and_is_kept_in_the_config():
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(data_path=Path("."), save_dir=Path("."), schedule="cosine", epochs=3)
    resolved, _ = make_schedule(torch.optim.Adam([weight]), cfg, SEL, 7, log=lambda _: None)
    assert resolved.schedule_steps == 21 and resolved.to_dict()["schedule_steps"] == 21


def test_onecycle_peaks_at_the_warmup_ends_at_min_lr_and_leaves_adams_betas_alone():
    lrs, optimizer = lr_curve(14, schedule="onecycle", warmup_steps=4, schedule_steps=10,
                              lr=1e-3, min_lr=1e-6)
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) in (3, 4)
    assert lrs[9:] == pytest.approx([1e-6] * 6)  # stepping past the end does not raise
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_plateau_is_the_default_and_sets_no_per_step_rate():
    lrs, _ = lr_curve(6)
    assert lrs == [1e-3] * 7


def test_a_warmup_past_the_horizon_is_refused():
    weight = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(data_path=Path("."), save_dir=Path("."), schedule="cosine",
                      warmup_steps=10, schedule_steps=10)
    with pytest.raises(RunError, match="--warmup_steps 10 must be below"):
        make_schedule(torch.optim.Adam([weight]), cfg, SEL, 5, log=lambda _: None)


@pytest.mark.parametrize("flags,words", [
    (["--warmup_steps", "-1"], "steps >= 0"),
    (["--schedule_steps", "x"], "steps >= 0"),
    (["--label_smoothing", "1"], "[0, 1)"),
    (["--label_smoothing", "-0.1"], "[0, 1)"),
    (["--schedule", "linear"], "invalid choice"),
])
def test_bad_values_exit_non_zero_with_a_clear_message(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--data_path", "d", "--save_dir", "s", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err and words in err


def log_rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "log.csv")))


def figures(run: Path) -> list[dict]:
    """The log rows without their timings."""
    return [{k: v for k, v in row.items() if k not in ("minutes", "data_wait")}
            for row in log_rows(run)]


def test_a_cosine_run_stopped_mid_epoch_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    flags = [*COMMON, "--epoches", "2", "--schedule", "cosine", "--warmup_steps", "3"]
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", ref, *flags)
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", stopped, *flags,
               "--max_steps", "5", "--save_every", "2")
    assert load_checkpoint(stopped / "last.pt")["step"] == 5
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", stopped, *COMMON,
               "--epoches", "2", "--from_check_point")
    assert same_weights(ref / "last.pt", stopped / "last.pt")
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(stopped / "last.pt")
    assert a["step_schedule"]["last_epoch"] == b["step_schedule"]["last_epoch"] == a["step"]
    assert figures(ref) == figures(stopped)
    assert float(log_rows(ref)[-1]["lr"]) == pytest.approx(TrainConfig.min_lr)
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", stopped, *COMMON,
                   "--epoches", "3", "--from_check_point", "--warmup_steps", "9", check=False)
    assert p.returncode == 1 and "--warmup_steps cannot change" in p.stderr
    assert "--init_from" in p.stderr and "Traceback" not in p.stderr


def test_an_old_checkpoint_resumes_as_plateau_and_refuses_another_schedule(tiny_dataset,
                                                                           tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", new, *COMMON,
               "--epoches", "1")
    shutil.copytree(new, old)
    ckpt = load_checkpoint(old / "last.pt")
    for name in ("schedule", "warmup_steps", "schedule_steps", "label_smoothing"):
        del ckpt["args"][name]
    save_checkpoint(ckpt, old / "last.pt")
    before = (old / "last.pt").read_bytes()
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", old, *COMMON,
                   "--epoches", "2", "--from_check_point", "--schedule", "cosine", check=False)
    assert p.returncode == 1 and "--schedule cannot change" in p.stderr
    assert (old / "last.pt").read_bytes() == before
    for run in (new, old):
        run_script("train.py", "--data_path", tiny_dataset, "--save_dir", run, *COMMON,
                   "--epoches", "2", "--from_check_point")
    assert same_weights(new / "last.pt", old / "last.pt")
    assert "step_schedule" not in load_checkpoint(old / "last.pt")
    assert load_checkpoint(old / "last.pt")["args"]["schedule"] == "plateau"


def test_label_smoothing_changes_the_training_loss_not_the_validation_loss(tiny_dataset,
                                                                          tmp_path):
    """At rate 0 the weights stay those of the seed, so both runs validate the same weights."""
    rows = {}
    for eps in ("0", "0.2"):
        run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / eps,
                   *COMMON, "--epoches", "1", "--lr", "0", "--min_lr", "0",
                   "--label_smoothing", eps)
        rows[eps] = log_rows(tmp_path / eps)[0]
    assert same_weights(tmp_path / "0" / "last.pt", tmp_path / "0.2" / "last.pt")
    assert float(rows["0.2"]["train_loss"]) != float(rows["0"]["train_loss"])
    assert math.isfinite(float(rows["0"]["val_loss"]))
    for key in ("val_loss", "val_acc"):
        assert rows["0.2"][key] == rows["0"][key]
