"""model/average.py and export_model.py --average: the mean of checkpoints of one model, and a
clear refusal of checkpoints that are not one model."""

from pathlib import Path

import pytest
import torch

from data.vocab import SPECIALS, Vocab
from model.average import average_checkpoints
from model.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from model.im2latex import Im2Latex, ModelConfig
from tests.conftest import run_script

VOCAB = Vocab([*SPECIALS, "x", "y", "+"])
CFG = ModelConfig(vocab_size=len(VOCAB), emb_dim=8, dec_rnn_h=8, enc_out_dim=8,
                  cnn_widths=(4, 4, 4, 4))


def checkpoint(path: Path, seed: int, cfg: ModelConfig = CFG, vocab: Vocab = VOCAB,
               half: bool = False) -> dict[str, torch.Tensor]:
    """Random weights of a tiny model, saved as a checkpoint; returns the weights."""
    torch.manual_seed(seed)
    state = Im2Latex(cfg).state_dict()
    for v in state.values():  # batch-norm counters differ, so "the first's" can be checked
        if not v.is_floating_point():
            v.fill_(seed)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_checkpoint({"model": state, "model_config": cfg.to_dict(), "vocab": vocab.to_dict(),
                     "step": seed}, path)
    return state


def test_the_mean_weighs_each_path_once_per_mention_and_keeps_the_first_counters(tmp_path):
    a, b = checkpoint(tmp_path / "a.pt", 1), checkpoint(tmp_path / "b.pt", 2)
    two = average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])
    three = average_checkpoints([tmp_path / "b.pt", tmp_path / "a.pt", tmp_path / "a.pt"])
    floats = [k for k, v in a.items() if v.is_floating_point()]
    counters = [k for k in a if k not in floats]
    assert floats and counters  # the model has both kinds, so both branches are tested
    for k in floats:
        assert torch.allclose(two["model"][k], (a[k] + b[k]) / 2, atol=1e-6)
        assert torch.allclose(three["model"][k], (2 * a[k] + b[k]) / 3, atol=1e-6)
    assert all(two["model"][k].item() == 1 and three["model"][k].item() == 2 for k in counters)
    assert two["step"] == 1 and two["vocab"] == VOCAB.to_dict()


def test_a_half_precision_model_averaged_with_a_float_one_keeps_float_precision(tmp_path):
    a = checkpoint(tmp_path / "a.pt", 1)
    h = checkpoint(tmp_path / "h.pt", 2, half=True)
    mean = average_checkpoints([tmp_path / "a.pt", tmp_path / "h.pt"])["model"]
    k = next(k for k, v in a.items() if v.is_floating_point() and v.numel() > 1)
    assert mean[k].dtype == torch.float32
    assert torch.equal(mean[k], ((a[k].double() + h[k].double()) / 2).float())


@pytest.mark.parametrize("other, words", [
    ({"cfg": ModelConfig(vocab_size=len(VOCAB), emb_dim=8, dec_rnn_h=16, enc_out_dim=8,
                         cnn_widths=(4, 4, 4, 4))}, ["another model", "dec_rnn_h"]),
    ({"vocab": Vocab([*SPECIALS, "x", "z", "+"])}, ["another vocabulary"]),
])
def test_checkpoints_of_another_model_are_refused_by_name(tmp_path, other, words):
    checkpoint(tmp_path / "a.pt", 1)
    checkpoint(tmp_path / "other.pt", 2, **other)
    with pytest.raises(CheckpointError) as e:
        average_checkpoints([tmp_path / "a.pt", tmp_path / "other.pt"])
    assert "other.pt" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        average_checkpoints([])


def test_export_writes_the_mean_in_half_precision_and_refuses_what_it_cannot(tmp_path):
    a, b = checkpoint(tmp_path / "a.pt", 1), checkpoint(tmp_path / "b.pt", 2)
    p = run_script("export_model.py", tmp_path / "a.pt", tmp_path / "mean.pt",
                   "--average", tmp_path / "b.pt")
    assert "mean of 2 checkpoints" in p.stdout
    shipped = load_checkpoint(tmp_path / "mean.pt")
    k = next(k for k, v in a.items() if v.is_floating_point() and v.numel() > 1)
    assert shipped["model"][k].dtype == torch.float16
    assert torch.allclose(shipped["model"][k].float(), (a[k] + b[k]) / 2, atol=2e-3)
    load_model(tmp_path / "mean.pt")  # it is a model inference can read
    checkpoint(tmp_path / "wide.pt", 3, cfg=ModelConfig(
        vocab_size=len(VOCAB), emb_dim=8, dec_rnn_h=16, enc_out_dim=8, cnn_widths=(4, 4, 4, 4)))
    before = (tmp_path / "mean.pt").read_bytes()
    p = run_script("export_model.py", tmp_path / "a.pt", tmp_path / "mean.pt",
                   "--average", tmp_path / "wide.pt", check=False)
    assert p.returncode == 1 and "another model" in p.stderr
    assert (tmp_path / "mean.pt").read_bytes() == before  # the earlier export is untouched
    p = run_script("export_model.py", tmp_path / "a.pt", "--onnx", tmp_path / "onnx",
                   "--average", tmp_path / "b.pt", check=False)
    assert p.returncode == 2 and "--average needs DST" in p.stderr
