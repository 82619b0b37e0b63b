"""Weight averaging: one model whose weights are the mean of several checkpoints' weights.

Why: fine-tuning the shipped model on new looks (fonts, augmentation) raises the rows it trains
on but has each time cost some accuracy on clean renders (docs/training.md, stages 5 and 6).
The mean of the fine-tuned weights and the weights it started from (WiSE-FT, Wortsman et al.
2022, "Robust fine-tuning of zero-shot models") often keeps most of both, at no training cost;
the mean of a run's last checkpoints (as fairseq's ``average_checkpoints.py`` takes) smooths the
noise of its final steps. Both need models of one lineage, fine-tuned from common weights:
independently trained networks order their units differently, and the mean of their weights
reads nothing. Which mean is better is for validation to say, like any other model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from model.checkpoint import CheckpointError, config_from_checkpoint, load_checkpoint


def average_checkpoints(paths: Sequence[str | Path]) -> dict:
    """The first checkpoint, its floating-point weights replaced by the mean over all of them
    (a path given twice counts twice); integer buffers (batch-norm counters) are the first's.

    The checkpoints must share the model config and the vocabulary: the same tensors meaning
    the same things. A CheckpointError names the first that does not.
    """
    if not paths:
        raise CheckpointError("nothing to average: no checkpoint given")
    first = load_checkpoint(paths[0])
    sums = {k: v.double() for k, v in first["model"].items() if v.is_floating_point()}
    for path in paths[1:]:
        ckpt = load_checkpoint(path)
        _check_same_model(first, ckpt, paths[0], path)
        for k in sums:
            sums[k] += ckpt["model"][k].double()
    # float32 whatever the inputs: a half-precision shipped model averaged with a training
    # checkpoint must not round the training one's weights to half
    model = {k: (sums[k] / len(paths)).float() if k in sums else v
             for k, v in first["model"].items()}
    return {**first, "model": model}


def _check_same_model(a: dict, b: dict, a_path: str | Path, b_path: str | Path) -> None:
    """Refuse to average checkpoints whose tensors do not correspond one to one."""
    # checked field by field (config_from_checkpoint refuses a malformed one by name), so
    # the message can say which sizes differ
    a_cfg = config_from_checkpoint(a["model_config"], str(a_path))
    b_cfg = config_from_checkpoint(b["model_config"], str(b_path))
    if a_cfg != b_cfg:
        diff = [f.name for f in fields(a_cfg) if getattr(a_cfg, f.name) != getattr(b_cfg, f.name)]
        raise CheckpointError(f"{b_path}: another model than {a_path} ({', '.join(diff)} "
                              "differ); only checkpoints of one model can be averaged")
    if a["vocab"] != b["vocab"]:
        raise CheckpointError(f"{b_path}: another vocabulary than {a_path}; only checkpoints "
                              "of one model can be averaged")
    def layout(ckpt: dict) -> dict:  # what must match for the mean to be taken tensor by tensor
        return {k: (tuple(v.shape), v.is_floating_point()) for k, v in ckpt["model"].items()}

    if layout(a) != layout(b):
        raise CheckpointError(f"{b_path}: its tensors differ from {a_path}'s in name, shape or "
                              "kind (floating point or integer)")
