"""Training state that cannot go stale: kills between the epoch-end writes, killed writers' temp
files, a full disk, malformed or corrupted checkpoints, and a loss that turns non-finite."""

import csv
import errno
import math
import struct
import subprocess
import sys
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
import training.loop
import training.state
from model.checkpoint import (
    _CONFIG_FIELDS,
    DEFAULT_MODEL,
    DIGEST,
    CheckpointError,
    load_checkpoint,
    load_model,
    remove_stale_temps,
    save_checkpoint,
)
from model.im2latex import ModelConfig
from tests.conftest import TINY_MODEL, run_script

ARGS = [*TINY_MODEL, "--batch_size", "8", "--workers", "0", "--quiet", "--dropout", "0.2"]
VOLATILE = {"minutes", "data_wait"}  # wall-clock figures: differ between any two runs


class Killed(BaseException):
    """Stands for SIGKILL: nothing in train.py catches it, and no write after it happens."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """In-process runs on one thread, as the scripts run in tests (--threads 1): on a shared
    2-core machine more threads spin against other processes, and runs to be compared must
    use the same count (kernels split their sums by thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "set_num_threads", lambda n: None)
        yield
    torch.set_num_threads(threads)


def run(data: Path, save_dir: Path, *extra: str) -> int:
    return train.main(["--data_path", str(data), "--save_dir", str(save_dir), *ARGS, *extra])


def log_rows(save_dir: Path) -> list[dict]:
    with open(save_dir / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]


def one_line_error(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory) -> Path:
    """Two epochs without interruption, checkpointing mid-epoch too."""
    ref = tmp_path_factory.mktemp("ref")
    assert run(tiny_dataset, ref, "--epoches", "2", "--save_every", "4") == 0
    return ref


@pytest.mark.parametrize("epoch,kill_before", [(1, "last.pt"), (2, "best.pt"), (1, "log.csv")])
def test_a_kill_between_the_epoch_end_writes_resumes_to_the_uninterrupted_best_and_log(
        tiny_dataset, reference, tmp_path, monkeypatch, epoch, kill_before):
    """Killed just before one of the writes at an epoch's end (last.pt, best.pt, the log row),
    then resumed: best.pt and log.csv end as in the run that was never killed. Epoch 2 improves
    on epoch 1, so a kill before its best.pt leaves epoch 1's, which resume must replace."""
    rows = log_rows(reference)
    assert float(rows[1]["val_loss"]) < float(rows[0]["val_loss"])  # epoch 2 writes best.pt
    save, write_log = training.state.save_checkpoint, training.loop.write_log

    def killed_save(state, path):
        if state["epoch"] == epoch and not state["step_in_epoch"] and Path(path).name == \
                kill_before:
            raise Killed
        save(state, path)

    def killed_log(save_dir, row):
        if row["epoch"] == epoch and kill_before == "log.csv":
            raise Killed
        write_log(save_dir, row)

    monkeypatch.setattr(training.state, "save_checkpoint", killed_save)
    monkeypatch.setattr(training.loop, "write_log", killed_log)
    with pytest.raises(Killed):
        run(tiny_dataset, tmp_path, "--epoches", "2", "--save_every", "4")
    monkeypatch.setattr(training.state, "save_checkpoint", save)
    monkeypatch.setattr(training.loop, "write_log", write_log)
    assert run(tiny_dataset, tmp_path, "--epoches", "2", "--from_check_point") == 0
    assert log_rows(tmp_path) == rows
    for name in ("best.pt", "last.pt"):
        a, b = load_checkpoint(reference / name), load_checkpoint(tmp_path / name)
        assert a["step"] == b["step"], name
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_temp_files_of_killed_writers_are_removed_on_start(tiny_dataset, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".last.pt.{dead.pid}.tmp"
        kept = [tmp_path / f".best.pt.{live.pid}.tmp", tmp_path / ".notes.tmp",
                tmp_path / "x.1.tmp"]
        for p in (stale, *kept):
            p.write_bytes(b"half a checkpoint")
        assert run(tiny_dataset, tmp_path, "--max_steps", "1") == 0
    finally:
        live.kill()
        live.wait()
    assert not stale.exists() and all(p.exists() for p in kept)
    assert f"removed {stale}" in capsys.readouterr().out
    assert remove_stale_temps(tmp_path) == [kept[0]]  # its writer is gone now


def full_disk_after(calls: int, monkeypatch) -> None:
    """torch.save fails like a full disk from its `calls`-th call on, after writing a part."""
    save, count = torch.save, [0]

    def save_or_fail(obj, f, *a, **k):
        count[0] += 1
        if count[0] < calls:
            return save(obj, f, *a, **k)
        f.write(b"PK\x03\x04 the start of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_or_fail)


def test_a_full_disk_is_a_one_line_error_that_keeps_the_previous_checkpoint(
        tiny_dataset, tmp_path, monkeypatch):
    full_disk_after(3, monkeypatch)  # last.pt at steps 1 and 2, then the disk is full
    with pytest.raises(CheckpointError) as e:
        run(tiny_dataset, tmp_path, "--max_steps", "5", "--save_every", "1")
    one_line_error(e, "disk full", str(tmp_path / "last.pt"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_malformed_model_configs_are_refused_by_name(tiny_dataset, tiny_model, tmp_path):
    ckpt = load_checkpoint(tiny_model)
    cases = {"emb_dim": -3, "dec_rnn_h": "32", "cnn_widths": [8, 8, 0, 16], "dropout": math.nan,
             "image_scale": 1e9, "add_position_features": "yes", "bogus": 1}
    for key, value in cases.items():
        path = tmp_path / f"{key}.pt"
        save_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], key: value}}, path)
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        one_line_error(e, str(path), key)
    path = tmp_path / "emb_dim.pt"
    image = Image.new("L", (120, 40), 255)
    image.paste(0, (20, 10, 100, 30))
    image.save(tmp_path / "ink.png")
    for script, *args in (("export_model.py", path, tmp_path / "out.pt"),
                          ("inference.py", "--model_path", path, tmp_path / "ink.png"),
                          ("train.py", "--data_path", tiny_dataset, "--save_dir",
                           tmp_path / "run", "--init_from", path)):
        p = run_script(script, *args, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, (script, p.stderr)
        assert p.stderr.strip().splitlines()[-1].startswith("error: "), (script, p.stderr)
        assert str(path) in p.stderr and "emb_dim" in p.stderr, (script, p.stderr)


def test_every_model_config_field_is_checked():
    assert set(_CONFIG_FIELDS) == {f.name for f in fields(ModelConfig)}


def flip_a_byte_in_a_tensor(path: Path) -> None:
    """Flip the lowest bit of the first float of the largest tensor: still finite, and torch
    reads the file without complaint."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    names, extra = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + names + extra] ^= 1
    path.write_bytes(raw)


def test_a_checkpoint_with_a_flipped_bit_is_refused(tiny_model, tmp_path):
    path = tmp_path / "copy.pt"
    save_checkpoint(load_checkpoint(tiny_model), path)
    before = torch.load(path, weights_only=True)
    flip_a_byte_in_a_tensor(path)
    after = torch.load(path, weights_only=True)  # torch itself sees nothing wrong
    assert after[DIGEST] == before[DIGEST]
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in after["model"])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    one_line_error(e, str(path), "corrupted")


def test_non_finite_weights_are_refused_even_without_a_checksum(tiny_model, tmp_path):
    ckpt = load_checkpoint(tiny_model)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key].view(-1)[0] = math.nan
    torch.save(ckpt, tmp_path / "nan.pt")  # as an older version or another tool would
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nan.pt")
    one_line_error(e, "nan.pt", "non-finite", key)


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path):
    """Checkpoints written before the digest existed (the first shipped model among them) load
    as they are; the shipped model itself now carries one, which load_checkpoint verifies."""
    shipped = torch.load(DEFAULT_MODEL, weights_only=True)
    assert DIGEST in shipped
    old = {k: v for k, v in shipped.items() if k != DIGEST}
    torch.save(old, tmp_path / "old.pt")  # as the earlier save_checkpoint wrote it
    model, vocab = load_model(tmp_path / "old.pt")
    assert len(vocab) == model.cfg.vocab_size
    load_model(DEFAULT_MODEL)


def test_a_non_finite_loss_stops_training_before_the_step(tiny_dataset, tmp_path, monkeypatch,
                                                          capsys):
    loss_sum, calls = training.loop.token_loss_sum, [0]

    def nan_from_step_4(*a, **k):
        calls[0] += 1
        return loss_sum(*a, **k) * (math.nan if calls[0] >= 4 else 1.0)

    monkeypatch.setattr(training.loop, "token_loss_sum", nan_from_step_4)
    assert run(tiny_dataset, tmp_path, "--max_steps", "8", "--save_every", "3") == 1
    err = capsys.readouterr().err
    assert "training loss became nan at step 4 (epoch 1)" in err, err
    ckpt = load_checkpoint(tmp_path / "last.pt")  # finite weights: it loads
    assert ckpt["step"] == 3
