"""The epoch loop: one training step (with its out-of-memory retry), one epoch, validation and
what an epoch's end writes.

The loss of a step is a sum over tokens divided by the global token count, so its gradients are
identical whether the batch runs in one piece, in micro-batches or spread over DDP ranks; the
batch order is a pure function of (seed, epoch), so a run resumed from `last.pt` mid-epoch sees
the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import collate
from data.vocab import Vocab
from model.checkpoint import BEST, LAST
from model.im2latex import Im2Latex
from model.sampling import teacher_forcing_ratio
from model.selection import Selection
from training import RunError
from training.config import TrainConfig
from training.distributed import Dist
from training.log import write_log
from training.schedule import Schedule
from training.sequence import Scst, reward_figures
from training.start import Data
from training.state import RunState


def token_loss_sum(logits: torch.Tensor, tgt_out: torch.Tensor, pad: int,
                   smoothing: float = 0.0) -> torch.Tensor:
    # logits: B x T x V, tgt_out: B x T -> summed cross-entropy over non-pad tokens
    # (label-smoothed for the training loss by --label_smoothing; validation passes 0)
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=pad,
                           reduction="sum", label_smoothing=smoothing)


def train_step(model: torch.nn.Module, batch: dict, tf: float, d: Dist, pad: int,
               chunks: int, amp: bool, smoothing: float = 0.0,
               seq: Scst | None = None) -> tuple[float, dict[str, float]]:
    """Forward and backward one global batch; returns its mean token loss (cross-entropy on
    the references) and, under sequence-level training (`seq`), the mean rewards of the
    samples and of the greedy sequences (training/sequence.py).

    The loss is a sum over tokens divided by the global token count, so gradients are
    identical whether the batch runs in one piece, in `chunks` micro-batches (after an
    out-of-memory error) or spread over DDP ranks (with `seq`, micro-batches draw other
    samples)."""
    tgt_out = batch["tgt_out"]
    tokens = d.sum(int((tgt_out != pad).sum()))[0]
    scale = d.world / max(tokens, 1)  # DDP averages gradients over ranks: undo that
    total, rewards = 0.0, [0.0] * 4
    pieces = list(zip(*(batch[k].tensor_split(chunks) for k in ("imgs", "tgt_in", "tgt_out"))))
    for i, (imgs, tgt_in, out) in enumerate(pieces):
        last = i == len(pieces) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
        imgs, tgt_in, out = (t.to(d.device, non_blocking=True) for t in (imgs, tgt_in, out))
        with sync:
            if seq is None:
                logits = model(imgs, tgt_in, teacher_forcing=tf, amp=amp)
                objective = loss_sum = token_loss_sum(logits, out, pad, smoothing)
            else:
                logits, scst_sum, sums = seq.forward(model, imgs, tgt_in, out, amp)
                loss_sum = token_loss_sum(logits, out, pad, smoothing)
                objective = seq.objective(loss_sum, scst_sum)
                rewards = [a + b for a, b in zip(rewards, sums)]
            (objective * scale).backward()
        total += loss_sum.item()
    if seq is None:
        return d.sum(total)[0] / max(tokens, 1), {}
    total, *rewards = d.sum(total, *rewards)
    return total / max(tokens, 1), reward_figures(rewards)


@torch.no_grad()
def validate(model: Im2Latex, loader: DataLoader, d: Dist, amp: bool,
             pad: int) -> dict[str, float]:
    """Teacher-forced loss and token accuracy over the validation split (sharded over ranks):
    cheap enough for every epoch; one of them (--select_by) picks best.pt and drives the
    learning-rate schedule and --early_stop."""
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    for batch in loader:
        tgt_out = batch["tgt_out"].to(d.device)
        logits = model(batch["imgs"].to(d.device), batch["tgt_in"].to(d.device), amp=amp)
        mask = tgt_out != pad
        loss_sum += token_loss_sum(logits, tgt_out, pad).item()
        correct += int(((logits.argmax(-1) == tgt_out) & mask).sum())
        tokens += int(mask.sum())
    model.train()
    loss_sum, tokens, correct = d.sum(loss_sum, tokens, correct)
    if tokens == 0:
        return {"val_loss": math.nan, "val_ppl": math.nan, "val_acc": math.nan}
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_acc": correct / tokens}


@dataclass
class Trainer:
    """What the epoch loop works with: the model (`net`: the same, in DDP when several ranks
    run), its optimizer and schedule, and how many micro-batches a step is split into."""

    cfg: TrainConfig
    d: Dist
    model: Im2Latex
    net: torch.nn.Module
    vocab: Vocab
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    sel: Selection
    amp: bool
    started: float = field(default_factory=time.time)
    chunks: int = 1  # micro-batches per step; doubled when a CUDA step runs out of memory
    seq: Scst | None = field(init=False)  # sequence-level training's part of a step, if any

    def __post_init__(self) -> None:
        self.seq = Scst.from_config(self.cfg)
        if self.seq is not None and self.model.cfg.dropout > 0:
            self.d.log(f"note: --seq_train {self.cfg.seq_train} trains with dropout off (the "
                       f"model's --dropout {self.model.cfg.dropout}): training/sequence.py "
                       "says why")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def checkpoint_parts(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "model_config": self.model.cfg.to_dict(),
                "vocab": self.vocab.to_dict(), "optimizer": self.optimizer.state_dict(),
                **self.scheduler.checkpoint_parts(), "args": self.cfg.to_dict()}

    def save(self, state: RunState, *names: str, epoch_end: dict | None = None) -> None:
        state.save(self.d, self.checkpoint_parts, *(self.cfg.save_dir / n for n in names),
                   epoch_end=epoch_end)

    def step(self, batch: dict, state: RunState) -> tuple[float, dict[str, float]]:
        """One optimizer step on `batch`; its loss and figures (train_step's). A loss or
        gradient that is not finite stops the run before the step, leaving last.pt as it was."""
        tf = teacher_forcing_ratio(self.cfg.sample_method, state.step, self.cfg.decay_k)
        loss, figures = self.forward_backward(batch, tf, state.step + 1)
        params = self.optimizer.param_groups[0]["params"]
        clip = self.cfg.clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else 0.0
        # Both should be the same on every rank (the loss is all-reduced, and so are the
        # gradients under DDP); the vote makes sure that all ranks stop at the same step.
        if self.d.sum(not (math.isfinite(loss) and math.isfinite(norm)))[0] > 0:
            what, value = ("gradient norm", norm) if math.isfinite(loss) else ("loss", loss)
            raise RunError(f"the training {what} became {float(value):g} at step "
                           f"{state.step + 1} (epoch {state.epoch + 1}); stopped before the "
                           f"optimizer step, {self.cfg.save_dir / LAST} is left as it was. Try "
                           "a lower --lr or --clip, or check the data")
        self.optimizer.step()
        self.scheduler.optimizer_stepped()
        return loss, figures

    def forward_backward(self, batch: dict, tf: float,
                         step: int) -> tuple[float, dict[str, float]]:
        """train_step, retried in twice as many micro-batches while a single-process CUDA run
        runs out of memory (the gradients are the same, see train_step); later steps keep the
        split that fitted."""
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                return train_step(self.net, batch, tf, self.d, self.vocab.pad_id, self.chunks,
                                  self.amp, self.cfg.label_smoothing, self.seq)
            except torch.cuda.OutOfMemoryError:
                if self.d.world > 1 or self.chunks >= len(batch["imgs"]):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.chunks *= 2
                self.d.log(f"\nout of GPU memory: step {step} retried in {self.chunks} "
                           f"micro-batches of ~{-(-len(batch['imgs']) // self.chunks)}")

    def wants_stop(self, step: int) -> bool:
        """--max_steps reached or --max_minutes spent on any rank: all ranks take part in the
        vote, so all stop at the same step."""
        cfg = self.cfg
        out_of_time = cfg.max_minutes and time.time() - self.started > cfg.max_minutes * 60
        want = bool((cfg.max_steps and step >= cfg.max_steps) or out_of_time)
        return self.d.sum(want)[0] > 0


class DataWait:
    """The share of an epoch's time spent waiting for the next batch, in steady state: the
    first batch also waits for the workers to start, so it is left out of both sums."""

    def __init__(self) -> None:
        self.seen, self.waited, self.worked = 0, 0.0, 0.0
        self.mark = self.arrived = time.perf_counter()

    def batch_arrived(self) -> None:
        self.arrived = time.perf_counter()
        if self.seen:
            self.waited += self.arrived - self.mark

    def step_done(self) -> None:
        self.seen += 1
        self.mark = time.perf_counter()  # every step ends in a host sync: the device is idle
        if self.seen > 1:
            self.worked += self.mark - self.arrived

    @property
    def fraction(self) -> float:
        return self.waited / max(self.waited + self.worked, 1e-9)


@dataclass
class Epoch:
    """How an epoch's training went: `complete` (all its batches done), `stop` (--max_steps or
    --max_minutes reached: no epoch after this one) and the share of time waiting for data."""

    complete: bool
    stop: bool
    data_wait: float


def train_one_epoch(t: Trainer, state: RunState, data: Data) -> Epoch:
    """Train on the epoch's batches from `state.step_in_epoch` on, checkpointing `last.pt`
    every --save_every steps and where a stop is decided."""
    cfg, d = t.cfg, t.d
    batches = data.sampler.batches(state.epoch)
    data.train.set_epoch(state.epoch)
    loader = DataLoader(data.train, batch_sampler=batches[state.step_in_epoch:],
                        collate_fn=collate, num_workers=cfg.workers,
                        pin_memory=d.device.type == "cuda", generator=torch.Generator())
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=cfg.quiet or not d.main, initial=state.step_in_epoch,
               total=len(batches), dynamic_ncols=True)
    state.start_epoch()
    clock, stop, window = DataWait(), False, []
    with bar:
        for batch in bar:
            clock.batch_arrived()
            loss, figures = t.step(batch, state)
            state.stepped(loss, figures)
            bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.2f}",
                            lr=f"{t.lr:.1e}", **{k: f"{v:.3f}" for k, v in figures.items()})
            if cfg.quiet:  # one batch's loss swings by 2x: a line shows the means since the last
                window.append({"loss": loss, **figures})
            if cfg.quiet and state.step % cfg.print_freq == 0:
                mean = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
                shown = "".join(f" {k} {v:.4f}" for k, v in mean.items() if k != "loss")
                d.log(f"epoch {state.epoch + 1} step {state.step} loss {mean['loss']:.4f} lr "
                      f"{t.lr:.3g}" + shown, flush=True)
                window.clear()
            stop = t.wants_stop(state.step)
            if stop or state.step % cfg.save_every == 0:
                t.save(state, LAST)
            clock.step_done()
            if stop:
                break
    complete = state.step_in_epoch >= len(batches)
    if not complete:
        d.log(f"stopped at step {state.step} (epoch {state.epoch + 1}, {state.step_in_epoch}/"
              f"{len(batches)}; {100 * clock.fraction:.1f}% of the time waiting for data); "
              "continue with --from_check_point")
    return Epoch(complete, stop, clock.fraction)


def end_epoch(t: Trainer, state: RunState, metrics: dict[str, float], data_wait: float) -> None:
    """Schedule the learning rate by the epoch's figure, then write last.pt, best.pt if it
    improved, and the log row. last.pt comes first and holds what the writes after it need: a
    kill between them is repaired on resume (state.finish_epoch_end)."""
    if math.isnan(metrics["val_loss"]):  # no validation data: follow the training loss
        metrics["val_loss"] = state.train_loss
    figure = metrics[t.sel.key]
    t.scheduler.epoch_end(figure)
    improved = state.end_epoch(figure, metrics["val_loss"], t.sel)
    train_loss = state.train_loss
    row = {"epoch": state.epoch, "step": state.step, "train_loss": round(train_loss, 5),
           "train_ppl": round(math.exp(min(train_loss, 50)), 4),
           **{k: round(v, 5) for k, v in state.epoch_figures.items()},
           **{k: round(v, 5) for k, v in metrics.items()}, "lr": t.lr,
           "minutes": round((time.time() - t.started) / 60, 2),
           "data_wait": round(data_wait, 4), "best_epoch": state.best.epoch}
    t.save(state, LAST, *([BEST] if improved else []),
           epoch_end={"row": row, "improved": improved})
    if not t.d.main:
        return
    write_log(t.cfg.save_dir, row)
    t.d.log(f"epoch {state.epoch}: train loss {train_loss:.4f}, val loss "
            f"{metrics['val_loss']:.4f}, val ppl {metrics['val_ppl']:.3f}, val token acc "
            f"{metrics['val_acc']:.4f}" + (" (best)" if improved else "")
            + f"; {100 * data_wait:.1f}% of the time waiting for data", flush=True)
