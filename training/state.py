"""Where a run stands (epoch, step, best figures, the epoch's running loss, the RNGs), saved in
every checkpoint and restored from one, so that a resumed run continues as if never stopped.

At an epoch's end `last.pt` is written first and carries what the writes after it need
(`epoch_end`: the log row and whether `best.pt` is due); `finish_epoch_end` makes those writes
on resume when a kill cut them short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.checkpoint import (
    BEST,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.selection import Best, Selection
from training.distributed import Dist
from training.log import read_log, write_log


@dataclass
class RunState:
    """The counters of a run; the checkpoint keys of the same names."""

    best: Best  # the best figure the run is selected by, and its epoch
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch done
    step: int = 0  # optimizer steps in total
    best_val_loss: float = math.inf
    ep_loss: float = 0.0  # the current epoch's training-loss sum, steps before a resume included
    ep_n: int = 0  # and its number of steps
    # the epoch's sums of the steps' other figures (sequence-level training's rewards)
    ep_figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        figures = {"ep_figures": dict(self.ep_figures)} if self.ep_figures else {}
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
                "best_val_loss": self.best_val_loss, "best": self.best.to_dict(),
                "ep_loss": self.ep_loss, "ep_n": self.ep_n, **figures}

    def start_epoch(self) -> None:
        """An epoch begun afresh starts its loss sums at zero; a resumed one keeps them."""
        if not self.step_in_epoch:
            self.ep_loss, self.ep_n, self.ep_figures = 0.0, 0, {}

    def stepped(self, loss: float, figures: dict[str, float] | None = None) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.ep_loss += loss
        self.ep_n += 1
        for name, value in (figures or {}).items():
            self.ep_figures[name] = self.ep_figures.get(name, 0.0) + value

    def end_epoch(self, figure: float, val_loss: float, sel: Selection) -> bool:
        """Count the epoch done; whether its `figure` (of `sel.key`) is the best so far."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        improved = sel.improves(figure, self.best.value)
        if improved:
            self.best.value, self.best.epoch = figure, self.epoch
        self.best_val_loss = min(self.best_val_loss, val_loss)
        return improved

    @property
    def train_loss(self) -> float:
        return self.ep_loss / max(self.ep_n, 1)

    @property
    def epoch_figures(self) -> dict[str, float]:
        """The epoch's mean of each figure the steps reported besides the loss."""
        return {name: total / max(self.ep_n, 1) for name, total in self.ep_figures.items()}

    def save(self, d: Dist, parts: Callable[[], dict[str, Any]], *paths: Path,
             epoch_end: dict | None = None) -> None:
        """Write this state, every rank's RNG states and `parts()` (model, optimizer, ...) to
        `paths`. A collective: every rank calls it, rank 0 writes."""
        rng = d.gather(rng_state())
        if not d.main:
            return
        state = {**parts(), "rng": rng, **self.to_dict()}
        if epoch_end is not None:
            state["epoch_end"] = epoch_end
        for path in paths:
            save_checkpoint(state, path)

    @classmethod
    def restore(cls, ckpt: dict, sel: Selection, d: Dist, save_dir: Path,
                log: Callable[..., None]) -> RunState:
        """The state a checkpoint holds, with this rank's RNG states set from it (reseeded
        when the checkpoint comes from another number of processes)."""
        states = ckpt["rng"]
        if len(states) == d.world:
            set_rng_state(states[d.rank])
        else:
            log(f"note: checkpoint from {len(states)} process(es), now {d.world}: RNG reseeded")
        state = cls(best=resumed_best(ckpt, sel, save_dir, log), epoch=ckpt["epoch"],
                    step_in_epoch=ckpt["step_in_epoch"], step=ckpt["step"],
                    best_val_loss=ckpt["best_val_loss"])
        if state.step_in_epoch:
            state.ep_loss, state.ep_n = ckpt.get("ep_loss", 0.0), ckpt.get("ep_n", 0)
            state.ep_figures = dict(ckpt.get("ep_figures", {}))
        return state


def resumed_best(ckpt: dict, sel: Selection, save_dir: Path, log: Callable[..., None]) -> Best:
    """The best so far of the figure the run now follows: stored in the checkpoint, or, for a
    checkpoint saved before --select_by or by the other figure, taken from log.csv."""
    stored = ckpt.get("best")
    if isinstance(stored, dict) and stored.get("key") == sel.key:
        return Best(sel.key, stored.get("value"), int(stored.get("epoch", 0)))
    best = Best.from_rows(sel, read_log(save_dir)[1], ckpt["epoch"])
    if sel.key == "val_loss" and math.isfinite(ckpt["best_val_loss"]):
        best.value = ckpt["best_val_loss"]  # log.csv's figures are rounded
    found = (f"from log.csv: {best.value} at epoch {best.epoch}" if best.value is not None
             else "no epoch has ended yet")
    log(f"note: the checkpoint holds no best {sel.key}; {found}")
    return best


def finish_epoch_end(save_dir: Path, ckpt: dict) -> None:
    """Make the writes that follow `last.pt` at an epoch's end (best.pt, the log row), on resume
    from that `last.pt` where a kill cut them short. `last.pt` is written first and carries both
    the row and whether the epoch was the best so far, so the run ends with the best.pt and
    log.csv an uninterrupted one would have left."""
    end = ckpt.get("epoch_end")
    if ckpt["step_in_epoch"] or not isinstance(end, dict):
        return
    if end.get("improved"):
        try:
            best_step = load_checkpoint(save_dir / BEST)["step"]
        except CheckpointError:
            best_step = None
        if best_step != ckpt["step"]:
            print(f"note: {BEST} was not written at the end of epoch {ckpt['epoch']}; written now")
            save_checkpoint(ckpt, save_dir / BEST)
    logged = {r.get("epoch") for r in read_log(save_dir)[1]}
    if isinstance(end.get("row"), dict) and str(ckpt["epoch"]) not in logged:
        write_log(save_dir, end["row"])
