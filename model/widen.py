"""Grow a trained model wider without changing what it computes (Net2Net's "wider" move, Chen et
al. 2016, in its simplest form).

Why: a wider model trained from scratch needs hours of CPU before it catches up with the shipped
one, so on two cores "is the model too narrow?" could not be asked at all. Grown from trained
weights, the wider model starts exactly where the narrow one is and the question becomes the
usual one: which of the two learns more in the same minutes.

How: every new unit (an LSTM hidden unit, a CNN channel, an embedding dimension) gets freshly
initialized *incoming* weights, like a new model's, and zero *outgoing* weights. So its
activation is some nonzero value that nothing reads yet: the grown model's outputs equal the
old ones (up to float rounding), in training mode too, and since the unit is active the
gradient of its outgoing weights is nonzero from the first step, so it starts to learn. (Zero
incoming weights as well would be a saddle point: a unit that is always 0 and read by nothing
gets no gradient at all.)

What may grow: `dec_rnn_h`, `emb_dim` and `cnn_widths`. Not `enc_out_dim`: the 2-D position
features spread their frequencies over all encoder channels (model/position.py), so more
channels would change the features the old ones carry. The vocabulary grows separately
(`Im2Latex.extend_vocab`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from model.im2latex import Im2Latex, ModelConfig

GROWABLE = ("dec_rnn_h", "emb_dim", "cnn_widths")
FIXED = ("enc_out_dim", "add_position_features", "batch_norm", "image_scale")  # dropout is free


class WidenError(ValueError):
    """A requested size the trained model cannot be grown to; the message says which."""


def check_growth(old: ModelConfig, new: ModelConfig) -> None:
    """Refuse a shape that is not the old one grown: a fixed field changed, or a size shrunk."""
    for name in GROWABLE:
        before, after = getattr(old, name), getattr(new, name)
        pairs = zip(before, after) if name == "cnn_widths" else [(before, after)]
        if any(b > a for b, a in pairs):
            raise WidenError(f"--{name} {_shown(after)} is narrower than the trained "
                             f"model's {_shown(before)}: a model can only grow")
    for name in FIXED:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            raise WidenError(f"--{name} cannot change from the trained model's {_shown(before)} "
                             f"to {_shown(after)}; only {', '.join(GROWABLE)} can grow")


def _shown(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def grown(model: Im2Latex, options: dict[str, Any], seed: int) -> Im2Latex:
    """`model` with the config fields in `options` set (model options given on a command line):
    widened where they change its shape or dropout, `model` itself where they change nothing.
    The one rule by which a run (`train.py --init_from CKPT --cnn_widths ... --seed S`) and
    export_model.py's grown start turn a checkpoint into the run's step 0, so that the two are
    the same weights and can be averaged. Raises WidenError."""
    wanted = replace(model.cfg, **options)
    return model if wanted == model.cfg else widen(model, wanted, seed)


def widen(model: Im2Latex, cfg: ModelConfig, seed: int = 0) -> Im2Latex:
    """A new Im2Latex of shape `cfg` (the old one grown, see `check_growth`) computing what
    `model` computes; new units' incoming weights are a fresh model's, drawn from `seed`."""
    cfg = replace(cfg, vocab_size=model.cfg.vocab_size)
    check_growth(model.cfg, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = Im2Latex(cfg)
    old_state, state = model.state_dict(), grown.state_dict()
    segments = _segments(model.cfg, cfg, grown)
    for name, fresh in state.items():
        if name in segments:
            state[name] = _embed(old_state[name], fresh, segments[name])
        elif old_state[name].shape == fresh.shape:  # batch-norm step counters
            state[name] = old_state[name]
        else:
            raise AssertionError(f"no layout for {name}, which grows")
    grown.load_state_dict(state)
    return grown.train(model.training)


# For each weight, per dimension: (old size, new size) of the parts it is made of, in order, and
# whether that dimension *reads* units (an input: new parts zeroed) or *is* them (an output: new
# parts keep their fresh values). A part grows at its end.
Segments = list[tuple[list[tuple[int, int]], bool]]


def _segments(old: ModelConfig, new: ModelConfig, grown: Im2Latex) -> dict[str, Segments]:
    h, e = (old.dec_rnn_h, new.dec_rnn_h), (old.emb_dim, new.emb_dim)
    c, v = (old.enc_out_dim,) * 2, (old.vocab_size,) * 2
    out = {
        "decoder.embed.weight": [([v], False), ([e], False)],
        "decoder.cell.weight_ih": [([h] * 4, False), ([e, h], True)],  # gates i f g o; [y, o]
        "decoder.cell.weight_hh": [([h] * 4, False), ([h], True)],
        "decoder.cell.bias_ih": [([h] * 4, False)],
        "decoder.cell.bias_hh": [([h] * 4, False)],
        "decoder.attention.W_2.weight": [([c], False), ([h], True)],
        "decoder.W_3.weight": [([h], False), ([h, c], True)],  # reads [h, context]
        "decoder.W_out.weight": [([v], False), ([h], True)],
    }
    for init in ("init_h", "init_c", "init_o"):
        out[f"decoder.{init}.weight"] = [([h], False), ([c], True)]
        out[f"decoder.{init}.bias"] = [([h], False)]
    channels = [(1, 1), *zip(old.cnn_widths, new.cnn_widths), c]
    layer = 0
    for name, module in grown.encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            layer += 1
            rows, cols = channels[layer], channels[layer - 1]
            out[f"encoder.{name}.weight"] = [([rows], False), ([cols], True), ([(3, 3)], False),
                                             ([(3, 3)], False)]
            if module.bias is not None:
                out[f"encoder.{name}.bias"] = [([rows], False)]
        elif isinstance(module, nn.BatchNorm2d):  # new channels: a fresh norm's identity
            for key in ("weight", "bias", "running_mean", "running_var"):
                out[f"encoder.{name}.{key}"] = [([channels[layer]], False)]
    return out


def _embed(old: Tensor, fresh: Tensor, segments: Segments) -> Tensor:
    """`fresh` with `old` written into the old part of every segment and the new parts of input
    dimensions zeroed: old D0 x D1 x ... -> new shape."""
    result = fresh.clone()
    new_index = []
    for dim, (parts, reads) in enumerate(segments):
        sizes = (sum(p[0] for p in parts), sum(p[1] for p in parts))
        if sizes != (old.shape[dim], fresh.shape[dim]):
            raise AssertionError(f"layout {parts} does not fit {tuple(old.shape)} -> "
                                 f"{tuple(fresh.shape)} in dimension {dim}")
        kept, start = [], 0
        for before, after in parts:
            kept.append(torch.arange(start, start + before))
            start += after
        kept_new = torch.cat(kept)
        if reads:
            added = torch.ones(fresh.shape[dim], dtype=torch.bool)
            added[kept_new] = False
            result.index_fill_(dim, added.nonzero().squeeze(1), 0.0)
        new_index.append(kept_new)
    result[torch.meshgrid(*new_index, indexing="ij")] = old
    return result
