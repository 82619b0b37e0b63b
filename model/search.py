"""Greedy decoding, sampling and batched beam search over a `Decoder`.

All take the encoder output of a whole batch (computed once, by the caller, without autograd),
compute the attention keys once, and then advance all images (and all K hypotheses or samples of
each image) together with a few tensor ops per step: no Python loop over images or hypotheses,
and the only host sync per step is the "has everything finished?" check that lets them stop
early.

Beam search keeps K hypotheses per image in B x K tensors (rows of the decoder state are
image-major, row = b * K + k).  The K hypotheses of an image share one copy of its encoder output
and keys: the attention broadcasts them, nothing is expanded or re-gathered per step.  A finished
hypothesis stays in the beam with a frozen score (its only continuation is eos at log-prob 0), and
the search stops when all B x K hypotheses have finished or after max_len steps.

Length normalisation: the beam is searched on the plain sum of token log-probabilities; among the
K final hypotheses of an image we pick the highest score / length ** length_norm, where length
counts the generated tokens including eos.  With the default length_norm = 1.0 that is the mean
token log-probability, the same number reported as the confidence in `Decoded.scores`;
length_norm = 0 picks the most probable sequence, which favours short outputs.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from im2latex.decoding import MAX_LEN  # torch-free home: the ONNX path and the API need it too
from model.decoder import Decoder, DecoderState, scratch_for


@dataclass
class Decoded:
    tokens: list[list[int]]  # per image, without <s> and </s>
    scores: Tensor  # B, mean token log-probability of the chosen sequence (eos included)
    attention: Tensor | None = None  # B x T x H' x W' attention maps (greedy, on request)


def _strip(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def _decode(
    decoder: Decoder,
    enc: Tensor,
    bos: int,
    eos: int,
    max_len: int,
    pick: Callable[[Tensor], tuple[Tensor, Tensor]],
    rows_per_image: int = 1,
    return_attention: bool = False,
) -> Decoded:
    """The loop greedy and sampled decoding share: enc B x L x C -> R = B x rows_per_image rows
    (image-major), each advanced by `pick(logp R x V) -> (chosen token's log-prob R, token R)`.
    The rows of an image share its keys, as beam search's hypotheses do."""
    batch = enc.shape[0] * rows_per_image
    keys = decoder.attention.keys(enc)  # B x L x A
    scratch = scratch_for(keys, rows_per_image)
    state = decoder.init_state(enc)
    if rows_per_image > 1:
        state = DecoderState(*(s.repeat_interleave(rows_per_image, dim=0) for s in state))
    prev = torch.full((batch,), bos, dtype=torch.long, device=enc.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=enc.device)
    total = torch.zeros(batch, device=enc.device)  # summed log-prob of the emitted tokens
    length = torch.zeros(batch, dtype=torch.long, device=enc.device)
    tokens, alphas = [], []
    for _ in range(max_len):
        state, alpha = decoder.step(state, prev, keys, enc, scratch)
        logp = torch.log_softmax(decoder.W_out(state.o), dim=-1)  # R x V
        chosen, prev = pick(logp)  # R, R
        alive = ~finished
        total += torch.where(alive, chosen, 0.0)
        length += alive
        tokens.append(prev)
        if return_attention:
            alphas.append(alpha)
        finished |= prev == eos
        if bool(finished.all()):
            break
    return Decoded(
        tokens=_strip(torch.stack(tokens, dim=1).tolist(), eos),
        scores=total / length,
        attention=torch.stack(alphas, dim=1) if return_attention else None,
    )


def greedy_search(
    decoder: Decoder,
    enc: Tensor,
    bos: int,
    eos: int,
    max_len: int = MAX_LEN,
    return_attention: bool = False,
) -> Decoded:
    """enc B x L x C -> argmax decoding of every image; attention is B x T x L when requested."""
    return _decode(decoder, enc, bos, eos, max_len, lambda logp: logp.max(dim=-1),
                   return_attention=return_attention)


def sample_search(
    decoder: Decoder,
    enc: Tensor,
    bos: int,
    eos: int,
    max_len: int = MAX_LEN,
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Decoded:
    """enc B x L x C -> `samples` sequences per image (B x samples rows, image-major), each
    token drawn from the model's softmax (temperature 1) with `generator` (None: torch's
    default RNG of enc's device, the one a training checkpoint saves).

    A row that has not drawn eos after max_len tokens is cut there: its `tokens` are then
    max_len long, while a finished row's are shorter (eos is not among them). Sequence-level
    training (training/sequence.py) rewards the samples."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")

    def draw(logp: Tensor) -> tuple[Tensor, Tensor]:
        token = torch.multinomial(logp.exp(), 1, generator=generator)  # R x 1
        return logp.gather(1, token).squeeze(1), token.squeeze(1)

    return _decode(decoder, enc, bos, eos, max_len, draw, rows_per_image=samples)


def beam_search(
    decoder: Decoder,
    enc: Tensor,
    bos: int,
    eos: int,
    max_len: int = MAX_LEN,
    beam_size: int = 5,
    length_norm: float = 1.0,
) -> Decoded:
    """enc B x L x C -> the best of beam_size hypotheses per image (see the module docstring)."""
    batch, k = enc.shape[0], beam_size
    vocab = decoder.W_out.out_features
    if k < 1:
        raise ValueError(f"beam_size must be >= 1, got {k}")
    device = enc.device
    keys = decoder.attention.keys(enc)  # B x L x A, shared by the K hypotheses of an image
    scratch = scratch_for(keys, k)
    state = DecoderState(*(s.repeat_interleave(k, dim=0) for s in decoder.init_state(enc)))
    prev = torch.full((batch * k,), bos, dtype=torch.long, device=device)
    # All K hypotheses start identical: let only the first one expand at step 0.  (Beams that
    # find no finite candidate, when K > V at step 0, stay at -inf and never win.)
    score = torch.zeros(batch, k, device=device)
    score[:, 1:] = float("-inf")
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    length = torch.zeros(batch, k, dtype=torch.long, device=device)
    eos_only = torch.full((vocab,), float("-inf"), device=device)  # continuation of a finished hyp
    eos_only[eos] = 0.0
    row_offset = torch.arange(batch, device=device).unsqueeze(1) * k  # B x 1
    history: list[tuple[Tensor, Tensor]] = []  # (token, parent beam), each B x K, per step
    for _ in range(max_len):
        state, _ = decoder.step(state, prev, keys, enc, scratch)
        logp = torch.log_softmax(decoder.W_out(state.o), dim=-1).view(batch, k, vocab)
        logp = torch.where(finished.unsqueeze(-1), eos_only, logp)
        score, flat = (score.unsqueeze(-1) + logp).view(batch, k * vocab).topk(k, dim=-1)  # B x K
        parent, token = flat // vocab, flat % vocab
        was_finished = finished.gather(1, parent)
        length = length.gather(1, parent) + ~was_finished
        finished = was_finished | (token == eos)
        rows = (parent + row_offset).view(-1)  # B*K rows of the surviving parents
        state = DecoderState(*(s.index_select(0, rows) for s in state))
        prev = token.view(-1)
        history.append((token, parent))
        if bool(finished.all()):
            break

    best = (score / length.float() ** length_norm).argmax(dim=-1, keepdim=True)  # B x 1
    beam, picked = best, []
    for token, parent in reversed(history):  # follow the back-pointers from the last step
        picked.append(token.gather(1, beam))
        beam = parent.gather(1, beam)
    sequences = torch.cat(picked[::-1], dim=1)  # B x T
    chosen = (score.gather(1, best) / length.gather(1, best)).squeeze(1)
    return Decoded(tokens=_strip(sequences.tolist(), eos), scores=chosen)
