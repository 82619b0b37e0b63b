"""The learning-rate schedule of a run (--schedule), built from its TrainConfig and the number of
optimizer steps in an epoch.

Why each kind exists:

- `plateau` (the default, what every earlier run trained with): ReduceLROnPlateau lowers the rate
  by --lr_decay after --lr_patience epochs without improvement of --select_by, stepped once per
  epoch. It needs no horizon, so it suits runs of open length that stop when they stop learning.
- `cosine`: a linear warm-up from ~0 to --lr over --warmup_steps, then a cosine decay to --min_lr
  at step --schedule_steps, and --min_lr after it; stepped once per optimizer step. Warm-up
  matters when fine-tuning shipped weights (--init_from): Adam's first steps, with moment
  estimates of one batch, would otherwise move trained weights at the full rate. A fixed horizon
  makes short runs compared at equal cost all end at the same low rate.
- `onecycle`: torch's OneCycleLR (peak --lr, from --lr/25, cosine both ways, ending at --min_lr
  over the same horizon; warm-up --warmup_steps, or OneCycleLR's 30% of the horizon when 0).
  Its momentum cycling is off (`cycle_momentum=False`): it would cycle Adam's beta1 between
  0.85 and 0.95, and a comparison of schedules should change the rate only.

Under every kind the --select_by figure still picks best.pt and drives --early_stop
(training/state.py); only the plateau kind lets it change the rate. The per-step schedule's state
is saved in checkpoints as "step_schedule", next to the plateau's "scheduler", and the schedule
of a run is fixed: a resumed run refuses a different one (training/start.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from model.selection import Selection
from training import RunError
from training.config import TrainConfig

ONE_CYCLE_START = 25.0  # OneCycleLR's div_factor: the cycle starts at --lr / 25
# what a resumed per-step run may not change: its rate curve is a function of these and the step
FIXED_PER_STEP = ("lr", "min_lr", "warmup_steps", "schedule_steps")


def cosine_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """The rate over --lr after `step` optimizer steps: (step + 1) / (warmup + 1) during the
    warm-up (never 0: a step at rate 0 is wasted), 1 at `warmup`, cosine down to `floor`
    (--min_lr / --lr) at `total`, `floor` after it."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total:
        return floor
    progress = (step - warmup) / (total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """The run's plateau schedule and, for the per-step kinds, the scheduler that sets the rate
    after every optimizer step (`per_step`, not stepped past `last_step`: OneCycleLR raises
    there)."""

    plateau: ReduceLROnPlateau
    per_step: LRScheduler | None = None
    last_step: float = math.inf

    def optimizer_stepped(self) -> None:
        """After each optimizer step (once, whatever the number of micro-batches)."""
        if self.per_step is not None and self.per_step.last_epoch < self.last_step:
            self.per_step.step()

    def epoch_end(self, figure: float) -> None:
        """The epoch's --select_by figure: it sets the rate under the plateau kind only."""
        if self.per_step is None:
            self.plateau.step(figure)

    def checkpoint_parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"scheduler": self.plateau.state_dict()}
        if self.per_step is not None:
            parts["step_schedule"] = self.per_step.state_dict()
        return parts

    def restore(self, ckpt: dict[str, Any], sel: Selection, log: Callable[[str], None]) -> None:
        """The saved state (after the optimizer's); a plateau schedule of the other figure
        (--select_by changed) restarts, keeping the rate."""
        if ckpt["scheduler"].get("mode", "min") == sel.mode:
            self.plateau.load_state_dict(ckpt["scheduler"])
        elif self.per_step is None:  # its plateau count and best were of the other figure
            log(f"note: the plateau schedule restarts, following {sel.key} now")
        if self.per_step is not None:
            if "step_schedule" not in ckpt:
                raise RunError("the checkpoint holds no per-step schedule state to resume")
            self.per_step.load_state_dict(ckpt["step_schedule"])


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, sel: Selection,
                  steps_per_epoch: int, log: Callable[[str], None] = print,
                  ) -> tuple[TrainConfig, Schedule]:
    """The schedule of --schedule, and the config with --schedule_steps 0 resolved to
    --epoches x `steps_per_epoch` (saved so, a resumed run keeps the horizon it started with).
    Build it before restoring a resumed run's optimizer: the per-step kinds set the rate."""
    plateau = ReduceLROnPlateau(optimizer, mode=sel.mode, factor=cfg.lr_decay,
                                patience=cfg.lr_patience, min_lr=cfg.min_lr)
    if cfg.schedule == "plateau":
        return cfg, Schedule(plateau)
    total = cfg.schedule_steps or cfg.epochs * steps_per_epoch
    cfg = replace(cfg, schedule_steps=total)
    if cfg.warmup_steps >= total:
        raise RunError(f"--warmup_steps {cfg.warmup_steps} must be below the schedule's "
                       f"horizon of {total} steps (--schedule_steps, or --epoches x "
                       f"{steps_per_epoch} steps per epoch)")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise RunError(f"--schedule {cfg.schedule} decays from --lr {cfg.lr:g} to --min_lr "
                       f"{cfg.min_lr:g}: --min_lr must be in [0, --lr]")
    warmup = cfg.warmup_steps or (round(0.3 * total) if cfg.schedule == "onecycle" else 0)
    log(f"learning rate: {cfg.schedule}, warm-up {warmup} steps, peak {cfg.lr:g}, "
        f"{cfg.min_lr:g} from step {total} on (the plateau schedule is off)")
    if cfg.schedule == "cosine":
        floor = cfg.min_lr / cfg.lr
        return cfg, Schedule(plateau, LambdaLR(optimizer, lambda step: cosine_factor(
            step, cfg.warmup_steps, total, floor)))
    start = cfg.lr / ONE_CYCLE_START
    cycle = OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                       pct_start=cfg.warmup_steps / total if cfg.warmup_steps else 0.3,
                       div_factor=ONE_CYCLE_START, cycle_momentum=False,
                       final_div_factor=start / cfg.min_lr if cfg.min_lr > 0 else 1e4)
    return cfg, Schedule(plateau, cycle, last_step=total - 1)
