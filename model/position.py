"""2-D sinusoidal position features for the encoder's feature grid.

The CNN output has no notion of where a feature sits in the formula, and the attention decoder
only ever sees an unordered set of L = H' x W' vectors.  Following Genthial's im2latex (which took
tensor2tensor's `add_timing_signal_nd`), we add fixed sines and cosines of the row index to the
first half of the channels and of the column index to the second half, so that the attention can
learn "look one step to the right" from the features alone.
"""

import math

import torch
from torch import Tensor


def position_features(
    height: int,
    width: int,
    channels: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    min_timescale: float = 1.0,
    max_timescale: float = 1.0e4,
) -> Tensor:
    """The H x W x C signal: channels [0, 2n) encode the row, [2n, 4n) the column (n = C // 4).

    Each axis gets n geometrically spaced frequencies, sin for the first n channels and cos for the
    next n.  Channels beyond 4n (when C is not a multiple of 4) stay zero.
    """
    n = channels // 4
    signal = torch.zeros(height, width, channels, device=device, dtype=torch.float32)
    if n == 0:
        return signal.to(dtype)
    log_increment = math.log(max_timescale / min_timescale) / max(n - 1, 1)
    inv_timescales = min_timescale * torch.exp(
        torch.arange(n, device=device, dtype=torch.float32) * -log_increment
    )  # n

    def timing(length: int) -> Tensor:
        scaled = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_timescales
        return torch.cat([scaled.sin(), scaled.cos()], dim=1)  # length x 2n

    signal[:, :, : 2 * n] = timing(height)[:, None, :]
    signal[:, :, 2 * n : 4 * n] = timing(width)[None, :, :]
    return signal.to(dtype)


def add_position_features(x: Tensor) -> Tensor:
    """x: B x H x W x C feature grid -> x plus the (broadcast) position signal, same shape."""
    _, height, width, channels = x.shape
    return x + position_features(height, width, channels, device=x.device, dtype=x.dtype)
