"""Checkpoints: plain containers written atomically, checksummed, read with `weights_only=True`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so loading it never
runs code from the file (`torch.load(..., weights_only=True)` refuses anything else). It is
written to a temporary file in the same folder, flushed to disk and renamed over the old one:
a kill at any moment leaves either the previous checkpoint or the new one, never half of one.
A sha256 of its content is stored with it, since torch reads a flipped bit in a tensor's bytes
without complaint and training would carry on from garbage; files saved before the checksum
existed (the shipped model among them) still load, and no checkpoint with non-finite weights
does.
"""

from __future__ import annotations

import errno
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

import torch

from data.files import atomic_open
from data.files import remove_stale_temps as remove_stale_temps  # train.py's import
from data.vocab import Vocab, VocabError
from model.im2latex import Im2Latex, ModelConfig

LAST, BEST = "last.pt", "best.pt"
DIGEST = "sha256"  # the key of the checksum in a checkpoint
# The shipped reference model, loaded by inference.py, evaluate.py and serve.py by default.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "im2latex.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(f)` into a file that replaces `path` atomically (data.files.atomic_open); a full
    disk is a CheckpointError that says the previous version is intact and what to do."""
    try:
        with atomic_open(path) as f:
            write(f)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(f"{path}: disk full while writing it ({e.strerror}); the previous "
                              f"version is intact. Free space in {Path(path).parent} and run "
                              "again (training: --from_check_point)") from None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    state = {k: v for k, v in state.items() if k != DIGEST}
    state[DIGEST] = content_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def content_digest(state: dict[str, Any]) -> str:
    """sha256 over every value of a checkpoint, tensors by dtype, shape and bytes, walked in an
    order fixed by the keys (not by insertion), so that a loaded checkpoint hashes as saved."""
    h = hashlib.sha256()
    for where, value in _leaves(state, ""):
        h.update(where.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().data)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _leaves(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key in sorted(obj, key=repr):
            yield from _leaves(obj[key], f"{where}/{key!r}")
    elif isinstance(obj, list | tuple):
        yield f"{where}:{type(obj).__name__}{len(obj)}", None
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{where}/{i}")
    else:
        yield where, obj


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
    verify(ckpt, path)
    return ckpt


def verify(ckpt: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose content differs from what was saved, or whose weights are not
    all finite (a file saved before checksums existed, or a run that diverged); the checksum is
    taken out of `ckpt`, as a new one is computed on each save."""
    stored = ckpt.pop(DIGEST, None)
    try:
        actual = content_digest(ckpt) if stored is not None else None
    except (RuntimeError, TypeError) as e:  # tensor kinds no checkpoint of ours holds
        raise CheckpointError(f"{path}: unreadable content ({e.__class__.__name__})") from None
    if stored != actual:
        raise CheckpointError(f"{path}: corrupted: its content does not match the checksum saved "
                              "with it (a damaged disk, copy or download); use another copy")
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in weights.values()):
        raise CheckpointError(f"{path}: its model entry is not a set of named tensors")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights in {bad[0]}"
                              + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                              + " (a corrupted file or a diverged run)")


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint",
                          device: str | torch.device = "cpu") -> tuple[Im2Latex, Vocab]:
    """Rebuild the model and vocabulary a checkpoint was trained with.

    Shipped weights are stored in half precision to halve the download; they are cast back to
    float32 here, since CPU inference in fp16 is slow and lossy."""
    try:
        vocab = Vocab.from_dict(ckpt["vocab"], source=f"{source} vocabulary")
    except (VocabError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    cfg = config_from_checkpoint(ckpt["model_config"], source)
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


# What each model_config field may hold. A damaged or hostile file must not build a model of
# negative size (torch fails deep inside) or of absurd size (it allocates until killed).
_MAX_WIDTH, _MAX_VOCAB = 1 << 16, 1 << 20


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number_in(low: float, high: float, low_open: bool) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, int | float) and not isinstance(v, bool)
                      and (low < v if low_open else low <= v) and v <= high)


_WIDTH = _int_in(1, _MAX_WIDTH)
_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "vocab_size": (_int_in(1, _MAX_VOCAB), f"an integer in 1..{_MAX_VOCAB}"),
    "emb_dim": (_WIDTH, f"an integer in 1..{_MAX_WIDTH}"),
    "dec_rnn_h": (_WIDTH, f"an integer in 1..{_MAX_WIDTH}"),
    "enc_out_dim": (_WIDTH, f"an integer in 1..{_MAX_WIDTH}"),
    "cnn_widths": (lambda v: isinstance(v, list | tuple) and len(v) == 4 and all(map(_WIDTH, v)),
                   f"4 integers in 1..{_MAX_WIDTH}"),
    "add_position_features": (lambda v: isinstance(v, bool), "true or false"),
    "batch_norm": (lambda v: isinstance(v, bool), "true or false"),
    "dropout": (_number_in(0, 1, low_open=False), "a number in [0, 1]"),
    "image_scale": (_number_in(0, 4, low_open=True), "a number in (0, 4]"),
}


def config_from_checkpoint(d: Any, source: str) -> ModelConfig:
    """The model config a checkpoint holds, every field checked, so that a bad one is refused
    with its name rather than failing as a traceback from inside torch."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: model_config is a {type(d).__name__}, not a mapping")
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(repr(k) for k in d if k not in names)
    if unknown:
        raise CheckpointError(f"{source}: model_config has unknown fields {', '.join(unknown)}")
    if "vocab_size" not in d:
        raise CheckpointError(f"{source}: model_config lacks vocab_size")
    for key, value in d.items():
        ok, wanted = _CONFIG_FIELDS.get(key, (lambda v: True, ""))
        if not ok(value):
            raise CheckpointError(f"{source}: model_config field {key} is {value!r:.60}, "
                                  f"expected {wanted}")
    return ModelConfig.from_dict(d)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Im2Latex, Vocab]:
    return model_from_checkpoint(load_checkpoint(path), source=str(path), device=device)


def export_weights(src: str | Path, dst: str | Path, note: str = "",
                   ckpt: dict | None = None) -> dict:
    """A training checkpoint reduced to what inference needs: half-precision weights, the model
    config and the vocabulary (no optimizer state), a fraction of the size, for shipping.

    ``ckpt``: the checkpoint already read from ``src`` and changed (model/average.py's mean of
    several); None reads ``src``."""
    ckpt = load_checkpoint(src) if ckpt is None else ckpt
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
