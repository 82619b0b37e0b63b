"""A figure of images, their predictions and where the decoder looked for each token.

Attention maps come on the encoder's grid (H' x W', about 8x coarser than the image); they are
stretched over the image so a reader can see which glyphs a token was read from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.vocab import Vocab
from im2latex.decoding import MAX_LEN
from model.im2latex import Im2Latex


@torch.inference_mode()
def attention_figure(model: Im2Latex, vocab: Vocab, images: Sequence[np.ndarray],
                     path: str | Path, names: Sequence[str] = (), max_len: int = MAX_LEN,
                     tokens_shown: int = 6, device: str | torch.device = "cpu") -> None:
    """One row per image: the image with its greedy prediction, then the attention of
    `tokens_shown` tokens spread over the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    cols = tokens_shown + 1
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 1.5 * len(images)),
                             squeeze=False)
    for row, img in enumerate(images):
        x = torch.from_numpy(img)[None, None].to(device)  # 1 x 1 x H x W
        dec = model.greedy(x, vocab.bos_id, vocab.eos_id, max_len, return_attention=True)
        ids = dec.tokens[0]
        maps = dec.attention[0].float().cpu().numpy()  # T x H' x W'
        title = " ".join(vocab.tokens[i] for i in ids)
        name = Path(names[row]).name if row < len(names) else f"image {row}"
        ax = axes[row][0]
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name}\n{title[:70]}{'…' if len(title) > 70 else ''}", fontsize=6,
                     loc="left")
        picks = np.linspace(0, max(len(ids) - 1, 0), tokens_shown).round().astype(int)
        for col, t in enumerate(picks, start=1):
            ax = axes[row][col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            if t < len(ids):
                h, w = img.shape
                ax.imshow(maps[t], cmap="magma", alpha=0.55, extent=(0, w, h, 0),
                          interpolation="bilinear")
                ax.set_title(vocab.tokens[ids[t]], fontsize=8)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
