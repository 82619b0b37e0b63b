"""Model selection and early stopping: which validation figure decides `best.pt`, the plateau
learning-rate schedule and when a run stops by itself.

Token accuracy is the default: the teacher-forced loss also punishes confidence in the tokens
the model gets wrong, and once a small fine-tuning set is learnt by heart that confidence grows
while reading still improves (issue 17: the loss bottomed out 10 epochs before the accuracy,
and held-out edit accuracy agreed with the accuracy). On a large set trained from scratch the
two rise and fall together, so the same default costs nothing there. All three decisions follow
one figure, so "no improvement" means the same thing to the schedule and to the stop: with
`--lr_patience` below `--early_stop` the rate is lowered before the run gives up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# --select_by choice -> the column of log.csv (and key of validate()'s figures) it follows
METRICS = {"acc": "val_acc", "loss": "val_loss"}
LEGACY = "loss"  # what runs saved before --select_by existed were selected by


@dataclass(frozen=True)
class Selection:
    """The figure a run is selected by and how many epochs without improvement it waits."""

    key: str  # "val_acc" or "val_loss"
    patience: int = 0  # 0: never stop early

    @classmethod
    def from_choice(cls, choice: str, patience: int, has_validation: bool) -> Selection:
        """Without validation images there is no accuracy; the loss then is the training
        loss (train.py's fallback), the only figure left."""
        if choice not in METRICS:
            raise ValueError(f"--select_by must be one of {', '.join(METRICS)}, got {choice!r}")
        if patience < 0:
            raise ValueError(f"--early_stop must be 0 (off) or a number of epochs, got {patience}")
        return cls(METRICS[choice] if has_validation else METRICS["loss"], patience)

    @property
    def higher_is_better(self) -> bool:
        return self.key != "val_loss"

    @property
    def mode(self) -> str:
        """ReduceLROnPlateau's mode for this figure."""
        return "max" if self.higher_is_better else "min"

    def improves(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def spent(self, epoch: int, best_epoch: int) -> bool:
        """Whether `patience` epochs have passed since the best one."""
        return self.patience > 0 and epoch - best_epoch >= self.patience

    def stop_message(self, epoch: int, best_epoch: int) -> str:
        return (f"no improvement in {self.key} for {self.patience} epochs: stopped after epoch "
                f"{epoch}; best epoch {best_epoch}")


@dataclass
class Best:
    """The best figure so far and its epoch (0 and None before the first epoch ends); stored in
    the checkpoint so that a resumed run counts the epochs since the best as an uninterrupted
    one does."""

    key: str
    value: float | None = None
    epoch: int = 0

    def to_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "epoch": self.epoch}

    @classmethod
    def from_rows(cls, sel: Selection, rows: Iterable[Mapping[str, str]], upto: int) -> Best:
        """The best of log.csv's rows up to epoch `upto`: for checkpoints without a stored best
        of this figure (saved before --select_by, or selected by the other figure)."""
        best = cls(sel.key)
        for row in sorted(rows, key=lambda r: int(r["epoch"])):
            epoch, value = int(row["epoch"]), float(row.get(sel.key) or math.nan)
            if epoch <= upto and sel.improves(value, best.value):
                best.value, best.epoch = value, epoch
        return best
