"""Training: what train.py is made of.

`config` (the run's options and the command line made from them), `start` (the model, the
vocabulary and the data a run starts from: new, resumed or fine-tuned), `loop` (the training
step with its out-of-memory retry, one epoch, validation, the epoch's end), `sequence`
(sequence-level fine-tuning: SCST's part of a step), `state` (the
counters and RNGs saved in checkpoints and restored from them), `log` (log.csv and its plot),
`distributed` (torchrun ranks). Imports go one way: train.py -> training -> model, data.
"""


class RunError(Exception):
    """A run that cannot start or go on; the message says why (train.py prints it, exits 1)."""
