"""What both decoding backends share, in a module that imports neither torch nor onnxruntime:
the length cap and the grouping of images into batches.

The PyTorch path (model/search.py, model/predict.py) and the torch-free API (im2latex/api.py)
both take these from here, so the default cap and the batching cannot drift apart between them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

# Longest prediction, in tokens (</s> excluded): the decoders stop there whatever the model says.
MAX_LEN = 150


def shape_batches(images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of `images` in batches of one shape each, at most `batch_size` long, in order of
    first appearance: a batch needs no padding, so it decodes exactly like its images one at a
    time, and every image is in exactly one batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_shape[img.shape].append(i)
    return [idx[k:k + batch_size] for idx in by_shape.values()
            for k in range(0, len(idx), batch_size)]
