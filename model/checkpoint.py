"""Checkpoints: plain containers written atomically, read with `weights_only=True`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so loading it never
runs code from the file (`torch.load(..., weights_only=True)` refuses anything else). It is
written to a temporary file in the same folder, flushed to disk and renamed over the old one:
a kill at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from data.vocab import Vocab, VocabError
from model.im2latex import Im2Latex, ModelConfig

LAST, BEST = "last.pt", "best.pt"
# The shipped reference model, loaded by inference.py, evaluate.py and serve.py by default.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "im2latex.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a run directory: its best model, else its latest
        path = path / BEST if (path / BEST).is_file() else path / LAST
    if not path.is_file():
        hint = (" (the shipped model is missing: `git checkout checkpoints/`, or pass --model_path)"
                if path == DEFAULT_MODEL else "")
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable im2latex checkpoint ({e.__class__.__name__}"
                              f": {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt \
            or "vocab" not in ckpt:
        raise CheckpointError(f"{path}: not an im2latex checkpoint (missing model, model_config "
                              "or vocab)")
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint",
                          device: str | torch.device = "cpu") -> tuple[Im2Latex, Vocab]:
    """Rebuild the model and vocabulary a checkpoint was trained with.

    Shipped weights are stored in half precision to halve the download; they are cast back to
    float32 here, since CPU inference in fp16 is slow and lossy."""
    try:
        vocab = Vocab.from_dict(ckpt["vocab"], source=f"{source} vocabulary")
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (VocabError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    if cfg.vocab_size != len(vocab):
        raise CheckpointError(f"{source}: model has {cfg.vocab_size} output tokens but the "
                              f"vocabulary {len(vocab)}")
    model = Im2Latex(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit the model: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), vocab


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Im2Latex, Vocab]:
    return model_from_checkpoint(load_checkpoint(path), source=str(path), device=device)


def export_weights(src: str | Path, dst: str | Path, note: str = "") -> dict:
    """A training checkpoint reduced to what inference needs: half-precision weights, the model
    config and the vocabulary (no optimizer state), a fraction of the size, for shipping."""
    ckpt = load_checkpoint(src)
    model_from_checkpoint(ckpt, source=str(src))  # refuse to export something that won't load
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    out = {"model": state, "model_config": ckpt["model_config"], "vocab": ckpt["vocab"],
           "epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0), "note": note,
           "args": ckpt.get("args", {})}
    save_checkpoint(out, dst)
    return out


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (dropout, scheduled sampling, shuffling)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_initialized():  # this process's device only: one GPU per DDP rank
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved by earlier versions: every visible device's state
        i = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
