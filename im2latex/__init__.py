"""im2latex: read images of printed formulas into LaTeX (the user-facing package).

    from im2latex import Reader
    print(Reader()("formula.png").latex)

Importing it must not import torch: the ONNX Runtime path runs without it. `Reader` and
`ImageError` are loaded on first use (im2latex/api.py), so importing `im2latex.prediction`
from the model code stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from im2latex.prediction import Prediction

if TYPE_CHECKING:
    from im2latex.api import ImageError, Reader

__all__ = ["ImageError", "Prediction", "Reader"]


def __getattr__(name: str):
    if name in ("Reader", "ImageError"):
        from im2latex import api

        return getattr(api, name)
    raise AttributeError(f"module 'im2latex' has no attribute {name!r}")
