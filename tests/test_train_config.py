"""train.py's options (training/config.py): made from TrainConfig's and ModelConfig's fields,
old and new spellings, the flags given on resume told from defaults, and a checkpoint whose
"args" the code before training/ wrote still resuming with its own options."""

import inspect
from dataclasses import fields

import pytest
import torch

import train
from model.checkpoint import load_checkpoint, save_checkpoint
from model.encoder import Encoder
from model.im2latex import ModelConfig
from tests.test_train_state import ARGS, _one_thread, run  # noqa: F401 (fixture)
from training.config import MODEL_OPTIONS, TrainConfig, parse_args

REQUIRED = ["--data_path", "d", "--save_dir", "s"]

# "args" as train.py wrote it into checkpoints before training/ (runs12/varied's last.pt, its
# paths and options changed to a tiny run): argparse's namespace, `epoches`, `from_check_point`,
# and from before --select_by (no select_by, no early_stop)
OLD_ARGS = {"data_path": "DATA", "save_dir": "RUN", "emb_dim": 16, "dec_rnn_h": 32,
            "enc_out_dim": 32, "cnn_widths": [8, 8, 16, 16], "add_position_features": True,
            "dropout": 0.2, "batch_norm": True, "image_scale": 1.0, "lr": 0.002, "min_lr": 3e-05,
            "lr_decay": 0.5, "lr_patience": 3, "clip": 0.5, "batch_size": 8, "max_len": 150,
            "epoches": 15, "sample_method": "inv_sigmoid", "decay_k": 5.0, "seed": 7,
            "augment": 0.0, "from_check_point": False, "init_from": None, "overwrite": False,
            "freeze_encoder": False, "max_steps": 5, "max_minutes": 0.0, "save_every": 500,
            "print_freq": 100, "workers": 0, "device": "cpu", "amp": "auto", "threads": 1,
            "quiet": True}


def test_the_defaults_are_the_dataclasses():
    cfg, given = parse_args(REQUIRED)
    assert given == {"data_path", "save_dir"}
    assert cfg.model == ModelConfig(vocab_size=0)
    for f in fields(TrainConfig):
        if f.name not in ("data_path", "save_dir", "model", "device"):
            assert getattr(cfg, f.name) == f.default, f.name
    assert set(MODEL_OPTIONS) == {f.name for f in fields(ModelConfig)} - {"vocab_size"}
    widths = inspect.signature(Encoder).parameters
    assert all(widths[p].default is inspect.Parameter.empty for p in ("widths", "out_dim",
                                                                       "batch_norm"))


def test_model_flags_and_both_spellings():
    cfg, _ = parse_args([*REQUIRED, "--epoches", "3", "--from_check_point", "--no_batch_norm",
                         "--cnn_widths", "8", "8", "16", "16", "--augment", "light"])
    new, _ = parse_args([*REQUIRED, "--epochs", "3", "--resume", "--no_batch_norm",
                         "--cnn_widths", "8", "8", "16", "16", "--augment", "0.5"])
    assert cfg == new
    assert cfg.epochs == 3 and cfg.resume and cfg.augment == 0.5
    assert cfg.model == ModelConfig(vocab_size=0, cnn_widths=(8, 8, 16, 16), batch_norm=False)
    with pytest.raises(SystemExit) as e:
        parse_args([*REQUIRED, "--early_stop", "-1"])
    assert e.value.code == 2


def test_given_options_win_on_resume_even_at_their_default(capsys):
    cfg, given = parse_args([*REQUIRED, "--lr", str(TrainConfig.lr), "--seed", "9"])
    saved = {"lr": 1e-3, "clip": 1.5, "seed": 9, "batch_size": 4, "workers": 7,
             "save_every": 100}
    resumed, changed = cfg.resumed(saved, given)
    assert (resumed.lr, resumed.clip, resumed.seed, resumed.batch_size) == (3e-4, 1.5, 9, 4)
    assert resumed.workers == TrainConfig.workers  # not an option that defines the run
    # a long run started to checkpoint often keeps doing so when continued without the flag
    assert resumed.save_every == 100
    assert resumed.select_by == "loss"  # saved before --select_by: selected by the loss
    assert changed == {"lr"} and "--lr changed from 0.001 to 0.0003" in capsys.readouterr().out


def test_a_checkpoint_with_the_old_args_resumes_with_its_options(tiny_dataset, tmp_path):
    """Killed at step 5 and resumed without flags, a run whose last.pt holds "args" as the old
    code wrote them ends with the weights of the same run never killed: its rate, clip, seed,
    schedule and selection came from the old dict."""
    flags = ["--lr", "0.002", "--clip", "0.5", "--seed", "7", "--select_by", "loss",
             "--sample_method", "inv_sigmoid", "--decay_k", "5", "--epoches", "1"]
    assert run(tiny_dataset, tmp_path / "ref", *flags) == 0
    old = tmp_path / "old"
    assert run(tiny_dataset, old, *flags, "--max_steps", "5") == 0
    ckpt = load_checkpoint(old / "last.pt")
    assert ckpt["step"] == 5 and ckpt["step_in_epoch"] == 5
    del ckpt["best"]
    ckpt["args"] = {**OLD_ARGS, "data_path": str(tiny_dataset), "save_dir": str(old)}
    save_checkpoint(ckpt, old / "last.pt")
    assert train.main(["--data_path", str(tiny_dataset), "--save_dir", str(old),
                       "--from_check_point", "--epoches", "1", "--workers", "0",
                       "--quiet"]) == 0
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(old / "last.pt")
    assert a["step"] == b["step"] and b["args"]["lr"] == 0.002
    assert b["args"]["select_by"] == "loss" and b["best"]["key"] == "val_loss"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
