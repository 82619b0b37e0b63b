"""Scheduled sampling (Bengio et al. 2015): how often training feeds the model its own guesses.

With teacher forcing the decoder only ever sees ground-truth prefixes, while at test time it sees
its own (possibly wrong) ones.  Scheduled sampling feeds, at each step t > 0 and independently for
each example, the model's previous argmax instead of the true token with probability 1 - epsilon,
where epsilon (the teacher-forcing ratio) decays over training.
"""

import math

import torch
from torch import Tensor

METHODS = ("teacher_forcing", "exp", "inv_sigmoid")


def teacher_forcing_ratio(method: str, step: int, decay_k: float) -> float:
    """epsilon at training step `step`: probability of feeding the ground-truth previous token.

    teacher_forcing: always 1.  exp: decay_k ** step (needs 0 < decay_k < 1).
    inv_sigmoid: k / (k + exp(step / k)) (needs k >= 1; starts near 1, falls off around
    step ~ k * ln k).
    """
    if method == "teacher_forcing":
        return 1.0
    if method == "exp":
        if not 0.0 < decay_k < 1.0:
            raise ValueError(f"exp schedule needs 0 < decay_k < 1, got {decay_k}")
        return decay_k**step
    if method == "inv_sigmoid":
        if decay_k < 1.0:
            raise ValueError(f"inv_sigmoid schedule needs decay_k >= 1, got {decay_k}")
        x = step / decay_k
        return 0.0 if x > 700.0 else decay_k / (decay_k + math.exp(x))  # exp(710) overflows
    raise ValueError(f"unknown sample_method {method!r}, expected one of {METHODS}")


def own_token_mask(
    batch: int,
    steps: int,
    teacher_forcing: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor | None:
    """B x T bool, True where step t of example b feeds the model's own previous argmax.

    All coins are drawn up front in one call, so the decoder loop does no per-step host work and
    the draw is reproducible from the generator's seed.  Column 0 is never used (step 0 always
    sees <s>).  None when teacher_forcing >= 1, so the plain path draws no random numbers at all.
    """
    if teacher_forcing >= 1.0:
        return None
    draw_device = generator.device if generator is not None else device
    coins = torch.rand(batch, steps, generator=generator, device=draw_device)
    return (coins >= teacher_forcing).to(device)
