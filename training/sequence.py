"""Sequence-level fine-tuning: self-critical sequence training (SCST, Rennie et al. 2017).

Maximum likelihood trains each token on the true prefix; the model is then judged on whole
sequences it produced from its own prefixes. SCST optimises the expected reward of sampled
sequences directly (REINFORCE), with the reward of the model's own greedy sequence as the
baseline: per image, K sequences drawn from the softmax (temperature 1) and the greedy one are
scored against the reference (`--seq_reward`: sentence BLEU-4 or edit similarity,
data/metrics.py), and each sample's log-probability is pushed up by its advantage
reward(sample) - reward(greedy): up when it beats what the model would answer now, down when
worse. The step's loss is `mix * ML + (1 - mix) * SCST` (`--seq_mix`), both per reference token.

How a step runs, and why it is exact:
  * Without autograd, the batch is encoded once and decoded by model/search.py's batched loop
    (`sample_search` for the K samples, `greedy_search` for the baseline), capped at the longest
    reference + MARGIN tokens (or --max_len + 1).
  * With autograd, one teacher-forced pass of the model (the function the ML loss uses) reads
    the reference rows and the B x K sample rows together, the K samples of an image sharing its
    one encoder pass (`image_of_row`). Fed the sampled prefix, the model gives at each step the
    distribution the token was drawn from, so the summed log-softmax of the sampled tokens
    (</s> included; a sample cut at the cap has none) is exactly the sequence's log-probability
    under the model: no second decoder code path, and the gradient flows through the fast
    training pass (the attention tape of model/decoder.py).
  * That holds when both passes compute the same function. Batch norm in training mode does:
    both encode the same images, so the batch statistics are the same (the sampling pass's
    update of the running statistics is undone, so they move once per step as in plain
    training). Dropout does not: the two passes would draw different masks, the samples would
    come from one network and be scored under another, and the gradient would be biased. So
    during an SCST step dropout is off, in the sampling and scoring passes and the ML rows
    alike (a note says so when the model has dropout). Scheduled sampling cannot share the pass
    either (its coins would also flip the sample rows), so --sample_method must stay
    teacher_forcing.
  * The draws come from torch's default RNG of the device, which checkpoints save with every
    rank's state (training/state.py): a resumed run draws the samples an uninterrupted one
    would. An out-of-memory retry in micro-batches draws other samples (the estimate stays
    unbiased but is not the same number).

Normalisation: the SCST sum is divided by K and, like the ML sum, by the batch's reference
token count, known before sampling: a normaliser that counted sampled tokens would be random
and would reward short samples through the division alone.

--seq_mix: Rennie et al. fine-tune with SCST alone (mix 0); Wu et al. 2016 (GNMT) keep an ML
weight of 0.017 beside the RL objective and Paulus et al. 2017 an RL weight of 0.9984, on
differently normalised losses, so those numbers do not carry over. The default 0.3 keeps
enough ML signal to anchor a model being fine-tuned at a low rate against drifting toward
reward-hacking outputs; it is to be measured (issue 13), not a published value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from data.metrics import edit_similarity, sentence_bleu
from data.vocab import Vocab
from model.im2latex import Im2Latex
from model.search import greedy_search, sample_search
from training import RunError

if TYPE_CHECKING:
    from training.config import TrainConfig

METHODS = ("none", "scst")  # --seq_train
REWARDS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "bleu": sentence_bleu, "edit": edit_similarity}  # --seq_reward: (reference, sample) -> [0, 1]
MARGIN = 10  # sampled tokens allowed beyond the batch's longest reference (with its </s>)


@contextmanager
def no_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Dropout layers in eval mode for the block (see the module docstring: the sampling and
    scoring passes must compute the same function); batch norm stays as it is."""
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in drops:
        m.train(False)
    try:
        yield
    finally:
        for m in drops:
            m.train(True)


def references(tgt_out: Tensor, pad: int, eos: int) -> list[list[int]]:
    """tgt_out B x T (`y1 .. yn </s> <pad>..`) -> each row's tokens without </s> and padding."""
    return [[t for t in row if t != pad and t != eos] for row in tgt_out.tolist()]


def sample_rows(samples: list[list[int]], cap: int, bos: int, eos: int,
                pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing rows for sampled sequences -> (tgt_in, tgt_out, mask), each R x T.

    A sample that drew </s> (fewer than `cap` tokens) is scored with it; one cut at `cap`
    tokens is scored on those tokens only. `mask` marks the scored positions: a sample may hold
    any token id, <pad> included, so the padding is told by length, not by id."""
    lengths = [len(s) + 1 if len(s) < cap else len(s) for s in samples]
    steps = max(lengths, default=1)
    tgt_in = torch.full((len(samples), steps), pad, dtype=torch.long)
    tgt_out = torch.full((len(samples), steps), pad, dtype=torch.long)
    for i, (seq, n) in enumerate(zip(samples, lengths)):
        out = seq + [eos] if n > len(seq) else seq
        tgt_in[i, :n] = torch.tensor([bos, *out[:-1]])
        tgt_out[i, :n] = torch.tensor(out)
    mask = torch.arange(steps) < torch.tensor(lengths).unsqueeze(1)
    return tgt_in, tgt_out, mask


def sequence_logprob(logits: Tensor, tgt_out: Tensor, mask: Tensor) -> Tensor:
    """logits R x T x V, tgt_out and mask R x T -> R, each row's summed log-probability of its
    tokens where mask is set."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, tgt_out.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, 0.0).sum(dim=1)


def pad_to(t: Tensor, steps: int, pad: int) -> Tensor:
    """B x T -> B x steps, filled with `pad` on the right."""
    return torch.nn.functional.pad(t, (0, steps - t.shape[1]), value=pad)


@dataclass(frozen=True)
class Scst:
    """The SCST part of a training step (see the module docstring), built once from the run's
    options; `None` from `from_config` when the run trains by maximum likelihood only."""

    samples: int  # K sequences sampled per image
    reward: Callable[[Sequence[int], Sequence[int]], float]
    mix: float  # weight of the ML loss
    max_len: int  # the longest reference trained on (tokens, </s> not counted)
    bos: int = Vocab.bos_id
    eos: int = Vocab.eos_id
    pad: int = Vocab.pad_id

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Scst | None:
        if cfg.seq_train == "none":
            return None
        if cfg.sample_method != "teacher_forcing":
            raise RunError(f"--seq_train {cfg.seq_train} does not combine with --sample_method "
                           f"{cfg.sample_method}: the model already feeds on its own samples "
                           "(training/sequence.py says why)")
        return cls(cfg.seq_samples, REWARDS[cfg.seq_reward], cfg.seq_mix, cfg.max_len)

    @torch.no_grad()
    def decode(self, model: Im2Latex, imgs: Tensor, cap: int,
               amp: bool) -> tuple[list[list[int]], list[list[int]]]:
        """imgs B x 1 x H x W -> (B x K sampled sequences, image-major; B greedy ones), at most
        `cap` tokens each, from the model in its training mode; buffers left as they were."""
        saved = [b.clone() for b in model.buffers()]
        enc = model.encode(imgs, amp)
        for b, old in zip(model.buffers(), saved):
            b.copy_(old)  # batch norm's running statistics: the scoring pass updates them
        with torch.autocast(enc.device.type, enabled=False):
            samples = sample_search(model.decoder, enc, self.bos, self.eos, cap, self.samples)
            greedy = greedy_search(model.decoder, enc, self.bos, self.eos, cap)
        return samples.tokens, greedy.tokens

    def advantages(self, refs: list[list[int]], samples: list[list[int]],
                   greedy: list[list[int]]) -> tuple[Tensor, list[float]]:
        """-> (reward(sample) - reward(greedy of its image), B x K; [summed sample rewards,
        samples, summed greedy rewards, images])."""
        k = self.samples
        sampled = torch.tensor([self.reward(refs[i // k], s) for i, s in enumerate(samples)])
        base = torch.tensor([self.reward(r, g) for r, g in zip(refs, greedy)])
        advantage = sampled - base.repeat_interleave(k)
        return advantage, [float(sampled.sum()), float(len(samples)), float(base.sum()),
                           float(len(refs))]

    def forward(self, net: torch.nn.Module, imgs: Tensor, tgt_in: Tensor, tgt_out: Tensor,
                amp: bool) -> tuple[Tensor, Tensor, list[float]]:
        """One (micro-)batch on the device: imgs B x 1 x H x W, tgt_in/tgt_out B x T ->
        (logits of the reference rows B x T x V, the SCST loss summed over samples and divided
        by K, reward sums as `advantages` gives them). `net` is the model or its DDP wrapper:
        the one pass with autograd goes through it, so DDP sees one forward per backward."""
        model: Im2Latex = getattr(net, "module", net)
        batch, steps = tgt_in.shape
        refs = references(tgt_out, self.pad, self.eos)
        cap = min(max(map(len, refs), default=0) + 1 + MARGIN, self.max_len + 1)
        with no_dropout(model):
            samples, greedy = self.decode(model, imgs, cap, amp)
            advantage, sums = self.advantages(refs, samples, greedy)
            s_in, s_out, mask = (t.to(imgs.device) for t in
                                 sample_rows(samples, cap, self.bos, self.eos, self.pad))
            width = max(steps, s_in.shape[1])
            rows = torch.cat([pad_to(tgt_in, width, self.pad), pad_to(s_in, width, self.pad)])
            image = torch.arange(batch, device=imgs.device)
            image_of_row = torch.cat([image, image.repeat_interleave(self.samples)])
            logits = net(imgs, rows, amp=amp, image_of_row=image_of_row)  # (B + BK) x T' x V
        logp = sequence_logprob(logits[batch:, : s_out.shape[1]], s_out, mask)
        scst = -(advantage.to(logp.device) * logp).sum() / self.samples
        return logits[:batch, :steps], scst, sums

    def objective(self, ml_sum: Tensor, scst_sum: Tensor) -> Tensor:
        """mix * ML + (1 - mix) * SCST, both summed over the (micro-)batch."""
        return self.mix * ml_sum + (1.0 - self.mix) * scst_sum


def reward_figures(sums: Sequence[float]) -> dict[str, float]:
    """A step's `advantages` sums (added over micro-batches and ranks) -> the mean reward of
    the samples and of the greedy sequences, as the step log and log.csv show them."""
    return {"reward": sums[0] / max(sums[1], 1.0), "greedy_reward": sums[2] / max(sums[3], 1.0)}
