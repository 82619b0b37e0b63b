"""What a reading returns, in a module that imports neither torch nor onnxruntime.

Both decoding backends (PyTorch in `model/predict.py`, ONNX Runtime in `im2latex/`) return this
type, so callers never learn which one ran and the torch-free path can share it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Prediction:
    latex: str
    score: float  # mean token log-probability of the chosen sequence (</s> included)
    # The measured chance that `latex` is exactly right (im2latex/confidence.py), filled by
    # im2latex.Reader; None where the model has no calibration made for its weights.
    confidence: float | None = None
    # Which of the image's readings (im2latex.Reader.readings) gave it: 0, the normalized
    # image; 1, the image read at the training scale after its glyph scale was ambiguous.
    reading: int = 0
