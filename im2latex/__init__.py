"""im2latex: read images of printed formulas into LaTeX (the user-facing package).

Importing it must not import torch: the ONNX Runtime path runs without it.
"""

from im2latex.prediction import Prediction

__all__ = ["Prediction"]
