"""The CNN encoder: luopeixiang/im2latex's five 3x3 convolutions, one input channel, with batch
normalization after each convolution (as in Deng et al.'s encoder).

Why the normalization: with PyTorch's default initialization each of the five layers shrinks its
input, and the plain stack's outputs vary by ~0.002 from one image position to the next, well
below the position features added to them. The decoder then cannot tell images apart, and in our
runs on the real corpus the training loss sat at the unigram entropy (~4.0 nats/token) for a
whole epoch, while the same decoder fed blank images learned the formula language model at
once. With batch norm every layer's output has unit scale from the first step.
`batch_norm=False` keeps the original stack (for comparisons with the reference code).

Shapes for a 64 x 320 image: 64x320 -> pool 33x161 -> pool 17x81 -> pool(2,1) 8x81 -> last conv
(no padding) 6x79, i.e. L = 474 feature vectors of `out_dim` channels.  The (2, 1) pool halves only
the height: formulas are long and short, so the width keeps more resolution than the height.
"""

from functools import partial

import torch.nn as nn
from torch import Tensor


def _conv(c_in: int, c_out: int, padding: int = 1, batch_norm: bool = True) -> list[nn.Module]:
    if not batch_norm:
        return [nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=padding), nn.ReLU()]
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=padding, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]  # the norm's shift replaces the bias


class Encoder(nn.Module):
    """Images B x C_in x H x W (float) -> features B x out_dim x H' x W'.

    `widths` are the channels of the first four convolutions; the fifth outputs `out_dim`
    (ModelConfig holds the defaults of all three).
    The last convolution has no padding, so images must be at least 18 pixels high and 6 wide.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        out_dim: int,
        in_channels: int = 1,
        *,
        batch_norm: bool,
    ):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"cnn_widths needs 4 entries, got {widths}")
        w1, w2, w3, w4 = widths
        conv = partial(_conv, batch_norm=batch_norm)
        self.net = nn.Sequential(
            *conv(in_channels, w1),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=1),
            *conv(w1, w2),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=1),
            *conv(w2, w3),
            *conv(w3, w4),
            nn.MaxPool2d(kernel_size=(2, 1), stride=(2, 1)),
            *conv(w4, out_dim, padding=0),
        )

    def forward(self, imgs: Tensor) -> Tensor:
        return self.net(imgs)
