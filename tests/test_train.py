import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from data.dataset import FormulaDataset
from data.vocab import Vocab
from model import Im2Latex
from model.checkpoint import load_checkpoint, load_model
from tests.conftest import ROOT, TINY_MODEL, run_script
from training.config import TrainConfig
from training.loop import DataWait

COMMON = [*TINY_MODEL, "--batch_size", "8", "--workers", "0", "--quiet", "--threads", "1",
          "--dropout", "0.2", "--sample_method", "inv_sigmoid", "--decay_k", "5"]


def same_weights(a, b) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_writes_checkpoints_logs_and_curves(tiny_dataset, tiny_model):
    run = tiny_model.parent
    for name in ("last.pt", "best.pt", "log.csv", "curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0 and rows[0]["val_loss"]
    ckpt = load_checkpoint(run / "last.pt")  # weights_only=True inside
    assert ckpt["epoch"] == 1 and ckpt["step"] > 0 and "optimizer" in ckpt and "rng" in ckpt
    model, vocab = load_model(run / "best.pt")
    assert vocab == Vocab.load(tiny_dataset / "vocab.json")
    assert not list(run.glob("*.tmp"))


def test_sigkill_and_resume_ends_with_the_same_weights(tiny_dataset, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", ref, *COMMON,
               "--epoches", "2")
    args = [sys.executable, str(ROOT / "train.py"), "--data_path", str(tiny_dataset),
            "--save_dir", str(killed), *COMMON, "--epoches", "2", "--save_every", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (killed / "last.pt").is_file() and load_checkpoint(killed / "last.pt")["step"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    step = load_checkpoint(killed / "last.pt")["step"]
    assert step < load_checkpoint(ref / "last.pt")["step"]
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", killed, *COMMON,
               "--epoches", "2", "--from_check_point")
    assert same_weights(ref / "last.pt", killed / "last.pt")


def test_more_epochs_from_checkpoint_equals_one_longer_run(tiny_dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", a, *COMMON,
               "--epoches", "2")
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", b, *COMMON,
               "--epoches", "1")
    assert not same_weights(a / "last.pt", b / "last.pt")
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", b, *COMMON,
               "--epoches", "2", "--from_check_point")
    assert same_weights(a / "last.pt", b / "last.pt")
    assert len(list(csv.DictReader(open(b / "log.csv")))) == 2


def test_a_new_lr_on_resume_replaces_the_saved_one(tiny_dataset, tmp_path):
    """The optimizer state holds the old rate; lowering it by hand on resume must take effect."""
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path, *COMMON,
               "--epoches", "1", "--lr", "1e-3", "--clip", "1.5")
    default = TrainConfig.lr  # given explicitly, the default counts too
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path, *COMMON,
                   "--epoches", "2", "--from_check_point", "--lr", str(default))
    assert f"--lr changed from 0.001 to {default}" in p.stdout
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["args"]["lr"] == default
    assert all(g["lr"] == default for g in ckpt["optimizer"]["param_groups"])
    assert ckpt["args"]["clip"] == 1.5  # flags not given keep the run's values


def test_bad_inputs_fail_clearly(tiny_dataset, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.json").write_text("{oops")
    p = run_script("train.py", "--data_path", bad, "--save_dir", tmp_path / "r", check=False)
    assert p.returncode == 1 and "malformed JSON" in p.stderr and "Traceback" not in p.stderr
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "none",
                   "--from_check_point", check=False)
    assert p.returncode == 1 and "no last.pt" in p.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "r2",
                   "--init_from", tmp_path / "junk.pt", check=False)
    assert p.returncode == 1 and "junk.pt" in p.stderr and "Traceback" not in p.stderr
    p = run_script("train.py", "--data_path", tmp_path / "missing", "--save_dir",
                   tmp_path / "r3", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_a_new_run_never_overwrites_an_old_one(tiny_dataset, tiny_model):
    run = tiny_model.parent
    before = (run / "last.pt").read_bytes()
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", run, check=False)
    assert p.returncode == 1 and "--from_check_point" in p.stderr and "--overwrite" in p.stderr
    assert (run / "last.pt").read_bytes() == before


def test_export_ships_half_precision_weights_that_load(tiny_dataset, tiny_model, tmp_path):
    dst = tmp_path / "shipped.pt"
    run_script("export_model.py", tiny_model, dst, "--note", "test")
    ckpt = load_checkpoint(dst)
    assert "optimizer" not in ckpt and ckpt["note"] == "test"
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert dst.stat().st_size < tiny_model.stat().st_size / 2
    model, vocab = load_model(dst)  # cast back to float32 for CPU inference
    assert next(model.parameters()).dtype == torch.float32
    assert vocab == load_model(tiny_model)[1]
    p = run_script("export_model.py", tmp_path / "missing.pt", dst, check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_the_log_says_how_long_training_waited_for_data(tiny_dataset, tmp_path, monkeypatch):
    """Measured per epoch (steady state): a loader slower than the steps shows up as waiting.
    The slow loader takes twice as long per batch as the step before it took, so the
    expected share (~2/3) holds however loaded the machine is."""
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # in-process: leave pytest's
    args = ["--data_path", str(tiny_dataset), *map(str, COMMON), "--epoches", "1"]
    assert train.main([*args, "--save_dir", str(fast)]) == 0
    last_step = [0.05]
    step_done = DataWait.step_done

    def timed_step_done(self: DataWait) -> None:
        step_done(self)
        last_step[0] = self.mark - self.arrived

    per_image = 8  # COMMON's --batch_size: the loader's 2x is spread over a batch's images
    read = FormulaDataset.__getitem__
    monkeypatch.setattr(DataWait, "step_done", timed_step_done)
    monkeypatch.setattr(FormulaDataset, "__getitem__", lambda self, i: (
        time.sleep(2 * last_step[0] / per_image), read(self, i))[1])
    assert train.main([*args, "--save_dir", str(slow)]) == 0
    wait = {run: float(next(csv.DictReader(open(run / "log.csv")))["data_wait"])
            for run in (fast, slow)}
    assert 0.0 <= wait[fast] < 0.5 < wait[slow] <= 1.0, wait


def test_a_step_out_of_gpu_memory_is_retried_in_micro_batches_with_the_same_result(
        tiny_dataset, tmp_path, monkeypatch, capsys):
    """The OOM path runs on CPU here: the model raises CUDA's out-of-memory error for any piece
    of more than 3 images, as a card with too little memory would."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    args = ["--data_path", str(tiny_dataset), *TINY_MODEL, "--no_batch_norm", "--batch_size",
            "8", "--workers", "0", "--quiet", "--max_steps", "4", "--amp", "off"]
    assert train.main([*args, "--save_dir", str(tmp_path / "whole")]) == 0
    forward = Im2Latex.forward

    def small_memory(self, imgs, *a, **k):
        if len(imgs) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, imgs, *a, **k)

    monkeypatch.setattr(Im2Latex, "forward", small_memory)
    assert train.main([*args, "--save_dir", str(tmp_path / "pieces")]) == 0
    out = capsys.readouterr().out
    assert "retried in 2 micro-batches" in out and "retried in 4 micro-batches" in out
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    pieces = load_checkpoint(tmp_path / "pieces" / "last.pt")
    assert whole["step"] == pieces["step"] == 4
    for k, w in whole["model"].items():
        torch.testing.assert_close(pieces["model"][k], w, rtol=1e-4, atol=1e-5, msg=k)


def test_the_quiet_log_shows_the_mean_loss_since_its_last_line(tiny_dataset, tmp_path, monkeypatch,
                                                               capsys):
    """Logged every step, then every 3 steps, the same seeded run: each line of the second is
    the mean of the three steps before it in the first, not the last batch's loss."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    args = ["--data_path", str(tiny_dataset), *map(str, COMMON), "--max_steps", "6"]

    def logged(freq: str, run: str) -> list[float]:
        capsys.readouterr()
        assert train.main([*args, "--save_dir", str(tmp_path / run), "--print_freq", freq]) == 0
        return [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", capsys.readouterr().out)]

    each, every3 = logged("1", "each"), logged("3", "every3")
    assert len(each) == 6 and len(every3) == 2
    for k, mean in enumerate(every3):
        assert mean == pytest.approx(sum(each[3 * k:3 * k + 3]) / 3, abs=2e-4)
    assert every3[0] != pytest.approx(each[2], abs=2e-4)  # the mean, not the last batch
