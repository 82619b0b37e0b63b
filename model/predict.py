"""Decode many images of mixed sizes: group by size, batch, and return results in input order.

im2latex.Reader's PyTorch backend decodes through here (inference.py, evaluate.py and the web
page through the Reader), so batching and ordering bugs (luopeixiang/im2latex merged result
lines across batches) can only live in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from data.vocab import Vocab
from im2latex.decoding import MAX_LEN, shape_batches
from im2latex.prediction import Prediction
from model.im2latex import Im2Latex

__all__ = ["Prediction", "predict"]


@torch.inference_mode()
def predict(model: Im2Latex, vocab: Vocab, images: Sequence[np.ndarray], *, beam_size: int = 5,
            max_len: int = MAX_LEN, batch_size: int = 32, device: str | torch.device = "cpu",
            on_batch: Callable[[int], None] | None = None) -> list[Prediction]:
    """Predictions for uint8 H x W images, in the order given.

    Images of one size share a batch (no extra padding, so a batch decodes exactly like its
    images one at a time); `on_batch(n)` is called after each batch, for progress bars."""
    model.eval()
    out: list[Prediction | None] = [None] * len(images)
    for chunk in shape_batches(images, batch_size):
        imgs = torch.from_numpy(np.stack([images[i] for i in chunk]))[:, None].to(device)
        if beam_size > 1:
            dec = model.beam_search(imgs, vocab.bos_id, vocab.eos_id, max_len,
                                    beam_size=beam_size)
        else:
            dec = model.greedy(imgs, vocab.bos_id, vocab.eos_id, max_len)
        for j, i in enumerate(chunk):
            out[i] = Prediction(vocab.decode(dec.tokens[j]), float(dec.scores[j]))
        if on_batch:
            on_batch(len(chunk))
    return out  # type: ignore[return-value]
