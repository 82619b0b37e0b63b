"""The chance that a reading is exactly right, from its score, as measured on validation images.

A reading's `score` (mean token log-probability, `im2latex.prediction`) ranks readings well but
is not a probability: exp(score) of a wrong reading is often above 90 %. `bench/confidence.py`
decodes validation formulas (clean renders and the screenshot-like and other-style images users
bring), measures how often readings of each score are token-for-token right, and stores that
as a monotone curve in a small JSON file next to the checkpoint. This module only evaluates
the stored curve, with numpy: no torch, so the ONNX Runtime path uses it too.

A curve holds only for the weights it was measured with, so the file carries the checkpoint's
sha256 (`model/checkpoint.py` DIGEST) and `load_calibration` refuses it for any other model:
the caller then shows no calibrated figure rather than a wrong one.

File (version 1):
    {"version": 1, "model_sha256": "<hex>", "feature": "mean_logprob",
     "curves": {"greedy": {"score": [...], "probability": [...]},
                "beam": {"score": [...], "probability": [...]}},
     "measured": {...free-form: how and on what the curves were measured...}}
`score` is increasing, `probability` non-decreasing in [0, 1]; between knots the curve is
linear, beyond them flat. Beam size 1 reads the "greedy" curve, any wider beam the "beam" one
(measured at the web page's default, 5).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 1
FEATURE = "mean_logprob"  # the only feature the decoders report today (Decoded.scores)
SUFFIX = ".calibration.json"
MEANING = "chance that this reading is exactly right, measured on validation images"


class CalibrationError(ValueError):
    """A calibration file that cannot be used: missing, malformed, or made for other weights."""


@dataclass(frozen=True)
class Curve:
    """A monotone map from score to probability: knots `score` (increasing) -> `probability`
    (non-decreasing, in [0, 1]), linear between knots and flat beyond them."""

    score: np.ndarray
    probability: np.ndarray

    def __post_init__(self) -> None:
        s, p = self.score, self.probability
        if s.ndim != 1 or s.shape != p.shape or len(s) < 1:
            raise ValueError("a curve needs as many probabilities as scores, at least one")
        if not (np.isfinite(s).all() and np.isfinite(p).all()):
            raise ValueError("a curve's knots must be finite")
        if (np.diff(s) <= 0).any() or (np.diff(p) < 0).any():
            raise ValueError("a curve's scores must increase and its probabilities not decrease")
        if p[0] < 0 or p[-1] > 1:
            raise ValueError("a curve's probabilities must lie in [0, 1]")

    def __call__(self, score: float | np.ndarray) -> float | np.ndarray:
        out = np.interp(score, self.score, self.probability)
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict:
        return {"score": [round(float(v), 6) for v in self.score],
                "probability": [round(float(v), 6) for v in self.probability]}

    @classmethod
    def from_dict(cls, d: object) -> Curve:
        if not isinstance(d, dict) or not {"score", "probability"} <= d.keys():
            raise ValueError("a curve is {\"score\": [...], \"probability\": [...]}")
        try:
            return cls(np.asarray(d["score"], dtype=float), np.asarray(d["probability"],
                                                                        dtype=float))
        except TypeError as e:
            raise ValueError(f"a curve's knots must be numbers ({e})") from None


def decoder_name(beam_size: int) -> str:
    """Which curve a beam size reads: greedy decoding scores differently from beam search."""
    return "greedy" if beam_size <= 1 else "beam"


@dataclass(frozen=True)
class Calibration:
    model_sha256: str
    curves: dict[str, Curve]
    measured: dict

    def probability(self, score: float, beam_size: int) -> float | None:
        """The measured chance that a reading of this score is exactly right; None where the
        score is not a number or no curve was measured for this decoder."""
        curve = self.curves.get(decoder_name(beam_size))
        if curve is None or not math.isfinite(score):
            return None
        return curve(score)

    def to_dict(self) -> dict:
        return {"version": VERSION, "model_sha256": self.model_sha256, "feature": FEATURE,
                "curves": {k: c.to_dict() for k, c in self.curves.items()},
                "measured": self.measured}

    @classmethod
    def from_dict(cls, d: object, source: str = "calibration") -> Calibration:
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise CalibrationError(f"{source}: not a version-{VERSION} calibration file")
        if d.get("feature") != FEATURE or not isinstance(d.get("model_sha256"), str):
            raise CalibrationError(f"{source}: needs model_sha256 and feature {FEATURE!r}")
        curves = d.get("curves")
        if not isinstance(curves, dict) or not curves:
            raise CalibrationError(f"{source}: no curves")
        try:
            parsed = {str(k): Curve.from_dict(v) for k, v in curves.items()}
        except ValueError as e:
            raise CalibrationError(f"{source}: {e}") from None
        measured = d.get("measured", {})
        return cls(d["model_sha256"], parsed, measured if isinstance(measured, dict) else {})


def calibration_path(model_path: str | Path) -> Path:
    """Where a checkpoint's calibration lives: `x.pt` -> `x.calibration.json`, beside it."""
    p = Path(model_path)
    return p.with_name(p.stem + SUFFIX) if p.suffix else p / ("best" + SUFFIX)


def load_calibration(path: str | Path, model_sha256: str) -> Calibration:
    """The calibration at `path`, checked to be made for the weights with this digest.

    Raises CalibrationError (missing, malformed, or measured on other weights): the caller says
    so and shows no calibrated confidence, since another model's curve would be a wrong one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no calibration for this model (run "
                               "bench/confidence.py)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: unreadable ({e.__class__.__name__})") from None
    cal = Calibration.from_dict(doc, str(path))
    if cal.model_sha256 != model_sha256:
        raise CalibrationError(f"{path}: measured on other weights (sha256 "
                               f"{cal.model_sha256[:12]}..., this model {model_sha256[:12]}...); "
                               "rerun bench/confidence.py for this model")
    return cal


def find_calibration(path: str | Path, model_sha256: str
                     ) -> tuple[Calibration | None, str | None]:
    """For a model being loaded: (the calibration at `path`, None) when it was made for these
    weights; (None, None) when there is none (a model nobody calibrated: no figure, nothing to
    say); (None, why) when a file is there but cannot be used (other weights, malformed), for
    the caller to print or log once: a wrong curve is never applied."""
    if not Path(path).exists():
        return None, None
    try:
        return load_calibration(path, model_sha256), None
    except CalibrationError as e:
        return None, f"{e}; no calibrated confidence"
