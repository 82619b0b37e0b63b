"""Growing a trained model wider (model/widen.py, train.py --init_from with larger sizes)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint, load_model
from model.im2latex import Im2Latex, ModelConfig
from model.widen import WidenError, grown, widen
from tests.conftest import run_script

SMALL = ModelConfig(vocab_size=30, emb_dim=8, dec_rnn_h=16, enc_out_dim=16,
                    cnn_widths=(4, 8, 8, 8), add_position_features=True)
GROWN = [dict(dec_rnn_h=24), dict(emb_dim=12), dict(cnn_widths=(6, 8, 12, 16)),
         dict(emb_dim=10, dec_rnn_h=20, cnn_widths=(5, 9, 9, 10))]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (3, 1, 40, 96), generator=g, dtype=torch.uint8)
    return imgs, torch.randint(0, SMALL.vocab_size, (3, 9), generator=g)


def _trained_looking(cfg: ModelConfig) -> Im2Latex:
    """A model whose batch-norm statistics are not the fresh ones (1 step in training mode)."""
    torch.manual_seed(0)
    model = Im2Latex(cfg).train()
    with torch.no_grad():
        model(*_batch())
    return model


@pytest.mark.parametrize("sizes", GROWN)
@pytest.mark.parametrize("training", [False, True])
def test_the_grown_model_computes_what_the_old_one_did(sizes, training):
    old = _trained_looking(SMALL).train(training)
    grown = widen(old, replace(SMALL, **sizes)).train(training)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in old.parameters())
    imgs, tgt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(grown(imgs, tgt), old(imgs, tgt), atol=1e-5, rtol=1e-5)
        if not training:
            a, b = old.greedy(imgs, 1, 2, max_len=12), grown.greedy(imgs, 1, 2, max_len=12)
            assert a.tokens == b.tokens


def test_new_units_learn():
    """Zero outgoing weights but active units: the first steps move them off zero."""
    grown = widen(_trained_looking(SMALL), replace(SMALL, dec_rnn_h=24)).train()
    opt = torch.optim.Adam(grown.parameters(), lr=1e-2)
    imgs, tgt = _batch()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(grown(imgs, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten()).backward()
        opt.step()
    d = grown.decoder
    assert d.W_out.weight[:, 16:].abs().sum() > 0  # the new hidden units are read now
    assert d.cell.weight_hh[:, 16:].abs().sum() > 0


@pytest.mark.parametrize("sizes, message", [
    (dict(dec_rnn_h=8), "narrower"),
    (dict(cnn_widths=(4, 8, 4, 8)), "narrower"),
    (dict(enc_out_dim=24), "enc_out_dim cannot change"),
    (dict(add_position_features=False), "add_position_features cannot change"),
])
def test_a_shape_that_is_not_a_growth_is_refused(sizes, message):
    with pytest.raises(WidenError, match=message):
        widen(Im2Latex(SMALL), replace(SMALL, **sizes))


def test_grown_changes_only_what_the_options_change():
    """The rule train.py --init_from and export_model.py --cnn_widths share: no options, or
    options equal to the model's, leave the model itself; a growth is widen's, from the seed."""
    model = _trained_looking(SMALL)
    assert grown(model, {}, 3) is model
    assert grown(model, {"cnn_widths": SMALL.cnn_widths}, 3) is model
    big = grown(model, {"cnn_widths": (6, 8, 12, 16)}, 3)
    ref = widen(model, replace(SMALL, cnn_widths=(6, 8, 12, 16)), 3)
    assert big.cfg == ref.cfg and big.cfg.vocab_size == SMALL.vocab_size
    assert all(torch.equal(a, b) for a, b in zip(big.state_dict().values(),
                                                 ref.state_dict().values()))
    assert grown(model, {"dropout": 0.3}, 3).cfg.dropout == 0.3
    with pytest.raises(WidenError, match="narrower"):
        grown(model, {"dec_rnn_h": 8}, 3)


def test_train_init_from_grows_the_model(tiny_dataset, tiny_model, tmp_path):
    old = load_checkpoint(tiny_model)["model_config"]
    run = tmp_path / "wide"
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", run, "--init_from",
                   tiny_model, "--dec_rnn_h", str(old["dec_rnn_h"] + 16), "--max_steps", "2",
                   "--batch_size", "8", "--workers", "0", "--quiet", "--threads", "1")
    assert "grown from" in p.stdout + p.stderr
    model, _ = load_model(run / "last.pt")
    assert model.cfg.dec_rnn_h == old["dec_rnn_h"] + 16
    assert model.cfg.cnn_widths == tuple(old["cnn_widths"])
    p = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "bad",
                   "--init_from", tiny_model, "--enc_out_dim", "64", check=False)
    assert p.returncode == 1 and "enc_out_dim cannot change" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "bad" / "last.pt").exists()


def test_export_model_writes_the_grown_start_a_grown_run_averages_with(tiny_dataset, tiny_model,
                                                                        tmp_path):
    """`export_model.py --cnn_widths W --seed S` is the shape `train.py --init_from --cnn_widths W
    --seed S` trains, computing what the small model computes, so the run's mean with it works."""
    old = load_checkpoint(tiny_model)["model_config"]
    widths = [w + 4 for w in old["cnn_widths"]]
    start = tmp_path / "start.pt"
    p = run_script("export_model.py", tiny_model, start, "--cnn_widths", *map(str, widths),
                   "--seed", "7")
    assert "grown to conv widths" in p.stdout
    grown, _ = load_model(start)
    small, _ = load_model(tiny_model)
    assert list(grown.cfg.cnn_widths) == widths
    imgs, tgt = _batch()
    tgt = tgt.clamp(max=small.cfg.vocab_size - 1)
    with torch.no_grad():  # half-precision export: equal up to its rounding
        assert torch.allclose(grown(imgs, tgt), small(imgs, tgt), atol=0.05)
    run_script("export_model.py", tiny_model, tmp_path / "s8.pt", "--cnn_widths",
               *map(str, widths), "--seed", "8")
    a, b = (load_checkpoint(f)["model"] for f in (start, tmp_path / "s8.pt"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new units come from the seed
    run = tmp_path / "run"
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", run, "--init_from",
               tiny_model, "--cnn_widths", *map(str, widths), "--seed", "7", "--max_steps", "1",
               "--batch_size", "8", "--workers", "0", "--quiet", "--threads", "1")
    p = run_script("export_model.py", run / "last.pt", tmp_path / "mean.pt", "--average", start)
    assert "the mean of 2" in p.stdout
    # the run's step 0 is the start of the same seed: one small step away from it, while the
    # fresh units of another seed are far (compared on the conv weights, which the growth drew)
    trained = load_checkpoint(run / "last.pt")["model"]
    conv = [k for k in a if k.startswith("encoder.") and a[k].dim() == 4]
    assert max((trained[k] - a[k].float()).abs().max().item() for k in conv) < 0.01
    assert max((trained[k] - b[k].float()).abs().max().item() for k in conv) > 0.05
    p = run_script("export_model.py", tiny_model, tmp_path / "x.pt", "--cnn_widths", "4",
                   check=False)
    assert p.returncode == 2 and "--seed" in p.stderr and not (tmp_path / "x.pt").exists()
