"""The calibrated confidence: the runtime curve (im2latex/confidence.py), the measures and fits
of bench/confidence.py that make it, and im2latex.Reader applying it only to the weights it was
made for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import confidence as bench
from data.vocab import SPECIALS, Vocab
from im2latex import Reader
from im2latex.confidence import (
    Calibration,
    CalibrationError,
    Curve,
    calibration_path,
    load_calibration,
)
from model import Im2Latex, ModelConfig
from model.checkpoint import DEFAULT_MODEL, content_digest, load_checkpoint, save_checkpoint
from model.predict import predict

TINY = dict(emb_dim=16, dec_rnn_h=24, enc_out_dim=32, cnn_widths=(8, 16, 16, 16))


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, callable]:
    """Scores in [-1, 0] and rightness drawn with a known chance sigmoid(8 s + 3)."""
    rng = np.random.default_rng(seed)
    score = rng.uniform(-1, 0, n)

    def truth(s):
        return 1 / (1 + np.exp(-(8 * s + 3)))

    return score, rng.random(n) < truth(score), truth


def straight_calibration(sha: str) -> Calibration:
    """Two straight curves over scores -5..0 with different slopes, so a test can tell which
    one a beam size read (other tests' files: `write_calibration`)."""
    knots = np.array([-5.0, 0.0])
    return Calibration(sha, {"greedy": Curve(knots, np.array([0.1, 0.9])),
                             "beam": Curve(knots, np.array([0.3, 0.6]))}, {"test": True})


def write_calibration(model_path: str | Path, sha: str) -> Calibration:
    """A straight calibration for the weights with digest `sha`, beside checkpoint
    `model_path`, where the loaders look for it."""
    cal = straight_calibration(sha)
    calibration_path(model_path).write_text(json.dumps(cal.to_dict()))
    return cal


def calibration(sha: str = "a" * 64) -> Calibration:
    score, correct, _ = synthetic(2000)
    return Calibration(sha, {"beam": bench.fit_isotonic(score, correct),
                             "greedy": bench.fit_platt(score, correct)}, {"n": 2000})


@pytest.mark.parametrize("beam_size", [1, 5])
def test_mapping_is_monotone_and_a_probability_everywhere(beam_size):
    cal = calibration()
    grid = np.linspace(-50, 5, 5001)  # far beyond the scores seen on both sides
    p = np.array([cal.probability(s, beam_size) for s in grid])
    assert (p >= 0).all() and (p <= 1).all()
    assert (np.diff(p) >= 0).all()
    assert p[-1] - p[0] > 0.5  # and it does separate low from high scores
    assert cal.probability(float("nan"), beam_size) is None


def test_curve_refuses_knots_that_are_not_a_monotone_probability():
    with pytest.raises(ValueError, match="not decrease"):
        Curve(np.array([-1.0, 0.0]), np.array([0.6, 0.4]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Curve(np.array([-1.0, 0.0]), np.array([0.2, 1.4]))
    with pytest.raises(ValueError, match="increase"):
        Curve(np.array([0.0, 0.0]), np.array([0.2, 0.4]))


def test_file_round_trip_and_digest_mismatch_is_refused(tmp_path):
    path = tmp_path / "m.calibration.json"
    path.write_text(json.dumps(calibration("a" * 64).to_dict()))
    cal = load_calibration(path, "a" * 64)
    assert cal.probability(-0.2, 5) == pytest.approx(calibration().probability(-0.2, 5), abs=1e-5)
    with pytest.raises(CalibrationError, match="other weights"):
        load_calibration(path, "b" * 64)
    with pytest.raises(CalibrationError, match="no calibration"):
        load_calibration(tmp_path / "missing.json", "a" * 64)
    doc = calibration().to_dict()
    doc["curves"]["beam"]["probability"] = doc["curves"]["beam"]["probability"][::-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="not decrease"):
        load_calibration(path, "a" * 64)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="unreadable"):
        load_calibration(path, "a" * 64)


def test_calibration_path_sits_beside_the_checkpoint(tmp_path):
    assert calibration_path("x/im2latex.pt").as_posix() == "x/im2latex.calibration.json"
    assert calibration_path(tmp_path) == tmp_path / "best.calibration.json"


@pytest.mark.parametrize("fit", ["isotonic", "platt"])
def test_fitting_recovers_a_known_chance(fit):
    score, correct, truth = synthetic(20000)
    curve = bench.FITS[fit](score, correct)
    grid = np.linspace(-0.9, -0.1, 41)
    assert np.abs(curve(grid) - truth(grid)).max() < 0.06
    # and it is calibrated on fresh draws: observed rate matches predicted in every bin
    score2, correct2, _ = synthetic(20000, seed=1)
    assert bench.ece(curve(score2), correct2) < 0.02
    assert bench.ece(np.full(len(score2), 0.9), correct2) > 0.3  # the measure can fail


def test_isotonic_never_claims_certainty_from_a_few_readings():
    curve = bench.fit_isotonic(np.array([-3.0, -2.0, -1.0, -0.5]),
                               np.array([False, False, True, True]))
    assert 0 < curve(-10.0) < 0.5 < curve(10.0) < 1


def test_auroc_on_a_hand_checked_case():
    # right readings score 0.35 and 0.8, wrong ones 0.1 and 0.4: 3 of the 4 pairs are ordered
    score = np.array([0.1, 0.4, 0.35, 0.8])
    correct = np.array([False, False, True, True])
    assert bench.auroc(score, correct) == pytest.approx(0.75)
    assert bench.auroc(-score, correct) == pytest.approx(0.25)
    assert bench.auroc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)
    assert np.isnan(bench.auroc(score, np.ones(4, bool)))
    assert bench.top_half_exact(score, correct) == pytest.approx(0.5)  # 0.8 right, 0.4 wrong


def test_rescoring_a_reading_gives_the_decoders_score():
    """The features the bench measures beside the score come from teacher-forcing the reading
    back; its mean must be the decoder's own score, or the comparison is between two models."""
    vocab = Vocab([*SPECIALS, *(f"t{i}" for i in range(12))])
    torch.manual_seed(0)
    model = Im2Latex(ModelConfig(vocab_size=len(vocab), **TINY)).eval()
    with torch.no_grad():  # untrained weights emit <pad>/<s>, which a reading's text drops:
        # logit 0 for them, below the best of the 13 other tokens' random logits
        model.decoder.W_out.weight[[vocab.pad_id, vocab.bos_id, vocab.unk_id]] = 0.0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, w), dtype=np.uint8) for w in (48, 48, 64)]
    for beam in (1, 3):
        preds = predict(model, vocab, images, beam_size=beam, max_len=12)
        per_token = bench.token_logprobs(model, vocab, images, [p.latex for p in preds], 12)
        for p, t in zip(preds, per_token):
            assert t.mean() == pytest.approx(p.score, abs=1e-4)


def test_runtime_module_imports_without_torch():
    code = "import sys, im2latex.confidence; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_shipped_calibration_is_for_the_shipped_model():
    """Rerun `python bench/confidence.py --report docs/results/confidence.txt` when this fails
    after the shipped model changed: the page would otherwise show no calibrated figure."""
    path = calibration_path(DEFAULT_MODEL)
    if not path.is_file():
        pytest.skip("no shipped calibration")
    cal = load_calibration(path, content_digest(load_checkpoint(DEFAULT_MODEL)))
    assert {"greedy", "beam"} <= cal.curves.keys()


def _tiny_checkpoint(path: Path) -> str:
    """An untrained tiny model saved at `path` -> its digest."""
    vocab = Vocab([*SPECIALS, *(f"t{i}" for i in range(12))])
    torch.manual_seed(0)
    model = Im2Latex(ModelConfig(vocab_size=len(vocab), **TINY))
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "vocab": vocab.to_dict()}, path)
    return content_digest(load_checkpoint(path))


def test_reader_applies_only_a_calibration_made_for_its_weights(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    sha = _tiny_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, w), dtype=np.uint8) for w in (48, 64)]

    def read(beam: int) -> tuple[Reader, list]:
        reader = Reader(ckpt, beam_size=beam, max_len=8)
        return reader, reader.decode(images)

    reader, plain = read(1)  # no file beside the model: nothing applied, nothing to say
    assert (reader.calibration, reader.calibration_note) == (None, None)
    assert [p.confidence for p in plain] == [None, None]

    cal = write_calibration(ckpt, sha)
    for beam in (1, 3):  # greedy and beam search read their own curves
        reader, preds = read(beam)
        assert reader.calibration.to_dict() == cal.to_dict() and reader.calibration_note is None
        want = [cal.curves["greedy" if beam == 1 else "beam"](p.score) for p in preds]
        assert [p.confidence for p in preds] == pytest.approx(want, abs=1e-9)
        assert all(0 <= c <= 1 for c in want)
    assert preds[0].confidence != pytest.approx(cal.curves["greedy"](preds[0].score))

    write_calibration(ckpt, "0" * 64)  # another model's curve, at the right place
    reader, refused = read(3)
    assert reader.calibration is None and [p.confidence for p in refused] == [None, None]
    assert "measured on other weights" in reader.calibration_note
    assert "\n" not in reader.calibration_note  # one line, for a script's stderr
    assert [(p.latex, p.score) for p in refused] == [(p.latex, p.score) for p in preds]


def test_the_rows_are_read_as_users_files_with_their_readings(tmp_path):
    """The calibration reads what Reader decodes: normalized readings of each file, through the
    robustness row builders (whose val_images row once needed an option confidence.py lacks)."""
    from PIL import Image

    from tests.test_robustness import formula_like

    images = tmp_path / "val_images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(formula_like(i)).save(images / f"{i}.png")
    (tmp_path / "match.txt").write_text("0.png 0\n1.png 1\n")
    (tmp_path / "formulas.txt").write_text("x ^ { 2 }\na + b\n")
    args = bench.get_args(["--conditions", "val_images", "--n", "2", "--val_images",
                           str(images), "--val_matching", str(tmp_path / "match.txt"),
                           "--val_formulas", str(tmp_path / "formulas.txt")])
    row, = bench.build_rows(args)
    assert len(row.images) == 2 and all(isinstance(r, tuple) and r[0].ndim == 2
                                        for r in row.images)
