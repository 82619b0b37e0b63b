"""Where a run starts from: a new model, a checkpoint to continue (`--from_check_point`) or
trained weights to fine-tune (`--init_from`); the model placed on this rank's device; the data;
the optimizer and its schedule, restored when the run continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from data.augment import Augmenter
from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.spelling import lacking_tokens, respell
from data.vocab import Vocab
from model.batch_norm import to_global_batch_norm
from model.checkpoint import BEST, LAST, load_checkpoint, model_from_checkpoint
from model.im2latex import Im2Latex
from model.selection import Selection
from model.widen import WidenError, grown
from training import RunError
from training.config import MODEL_OPTIONS, TrainConfig
from training.distributed import Dist
from training.log import CURVES, LOG
from training.schedule import FIXED_PER_STEP, Schedule
from training.state import finish_epoch_end


@dataclass
class Start:
    """The model and vocabulary a run starts with; for a resumed run also the checkpoint it
    continues, its config with the run's own options restored, and the options given anew."""

    cfg: TrainConfig
    model: Im2Latex
    vocab: Vocab
    resume: dict[str, Any] | None = None
    changed: set[str] = field(default_factory=set)


def start_run(cfg: TrainConfig, given: frozenset[str], d: Dist) -> Start:
    return resume_run(cfg, given, d) if cfg.resume else new_run(cfg, given, d)


def resume_run(cfg: TrainConfig, given: frozenset[str], d: Dist) -> Start:
    """Continue the run in --save_dir from its last.pt, finishing first the writes of an epoch
    end that a kill cut short."""
    last = cfg.save_dir / LAST
    if not last.is_file():
        raise RunError(f"--from_check_point: no {LAST} in {cfg.save_dir}")
    ckpt = load_checkpoint(last)
    if d.main:
        finish_epoch_end(cfg.save_dir, ckpt)
    cfg, changed = cfg.resumed(ckpt.get("args", {}), given, d.log)
    fixed = changed & {"schedule", *(FIXED_PER_STEP if cfg.schedule != "plateau" else ())}
    if fixed:
        raise RunError(f"--{' --'.join(sorted(fixed))} cannot change when a run resumes: its "
                       "learning-rate schedule is fixed; start a new run from its weights "
                       f"instead (--init_from {last})")
    model, vocab = model_from_checkpoint(ckpt, source=str(last))
    data_vocab_path = cfg.data_path / "vocab.json"
    data_vocab = Vocab.load(data_vocab_path) if data_vocab_path.is_file() else vocab
    if data_vocab != vocab:
        missing = len(vocab.unknown(data_vocab.tokens))
        d.log(f"note: {data_vocab_path} differs from the checkpoint's vocabulary; training "
              f"continues with the checkpoint's ({missing} tokens of the data map to <unk>)")
    return Start(cfg, model, vocab, ckpt, changed)


def new_run(cfg: TrainConfig, given: frozenset[str], d: Dist) -> Start:
    """A new model of --emb_dim etc., or the --init_from one (grown where sizes are given), in a
    --save_dir without a run (or with one to be replaced: --overwrite)."""
    if (cfg.save_dir / LAST).is_file() and not cfg.overwrite:
        raise RunError(f"{cfg.save_dir} already holds a run ({LAST}); continue it with "
                       "--from_check_point, or pass --overwrite to start over")
    if cfg.overwrite and d.main:  # an old best.pt or log would pass for this run's
        for name in (LAST, BEST, LOG, CURVES):
            (cfg.save_dir / name).unlink(missing_ok=True)
    data_vocab = Vocab.load(cfg.data_path / "vocab.json")
    if cfg.init_from:
        sizes = {name: getattr(cfg.model, name) for name in MODEL_OPTIONS if name in given}
        model, vocab = init_from(cfg.init_from, data_vocab, d, sizes, cfg.seed)
    else:
        vocab = data_vocab
        model = Im2Latex(replace(cfg.model, vocab_size=len(vocab)))
    return Start(cfg, model, vocab)


def init_from(path: str, data_vocab: Vocab, d: Dist, sizes: dict[str, Any] | None = None,
              seed: int = 0) -> tuple[Im2Latex, Vocab]:
    """Weights of a trained model for a new run. Model options given with them (`sizes`) grow
    it wider, computing the same function (model/widen.py), or set its dropout. Tokens the new
    data has and the model lacks are appended to its vocabulary, so their rows are new and every
    trained row keeps its id."""
    model, vocab = model_from_checkpoint(load_checkpoint(path), source=path)
    before = sum(p.numel() for p in model.parameters())
    try:
        model = grown(model, sizes or {}, seed)
    except WidenError as e:
        raise RunError(f"--init_from {path}: {e}") from None
    after = sum(p.numel() for p in model.parameters())
    if after != before:  # else nothing or only the dropout changed
        d.log(f"init_from: the model grown from {before:,} to {after:,} parameters")
    extended = vocab.extended(data_vocab.tokens)
    if len(extended) > len(vocab):
        d.log(f"init_from: vocabulary extended by {len(extended) - len(vocab)} tokens "
              f"({' '.join(extended.tokens[len(vocab):][:10])} ...)")
        model.extend_vocab(len(extended))
    return model.train(), extended


def place(model: Im2Latex, cfg: TrainConfig, d: Dist) -> Im2Latex:
    """The model on this rank's device, in training mode, its encoder frozen if asked, and with
    batch-norm statistics over the global batch when several ranks run, as one process would
    compute them. Wrap it in DDP (`wrap`) after making its optimizer."""
    model.to(d.device).train()
    if cfg.freeze_encoder:
        model.freeze_encoder()
    if d.world > 1 and model.cfg.batch_norm:
        if d.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # SyncBatchNorm needs CUDA
            model = to_global_batch_norm(model)
    return model


def wrap(model: Im2Latex, d: Dist) -> torch.nn.Module:
    if d.world == 1:
        return model
    return DDP(model, device_ids=[d.device] if d.device.type == "cuda" else None)


@dataclass
class Data:
    """The training set and its batch order (one size bucket per batch, order fixed by (seed,
    epoch), sharded over ranks), and the validation loader."""

    train: FormulaDataset
    val: FormulaDataset
    sampler: BucketBatchSampler
    val_loader: DataLoader


def _optional_transforms(cfg: TrainConfig) -> list[tuple[str, str, float]]:
    """(flag, name, share) of each optional augmentation transform the run draws."""
    return [(flag, what, share) for flag, what, share in (
        ("--augment_low_res", "low-resolution", cfg.augment_low_res),
        ("--augment_binary", "binary", cfg.augment_binary)) if share]


def load_data(cfg: TrainConfig, d: Dist, vocab: Vocab) -> Data:
    data_dir = Path(cfg.data_path)
    optional = _optional_transforms(cfg)
    if optional and not cfg.augment:
        raise RunError(f"{optional[0][0]} shares out augmented images: it needs --augment")
    augment = (Augmenter(cfg.augment, cfg.seed, cfg.augment_low_res, cfg.augment_binary)
               if cfg.augment else None)
    relabel = None if cfg.label_spelling == "as_is" else partial(respell,
                                                                   spelling=cfg.label_spelling)
    train = FormulaDataset(data_dir / "shards" / "train", vocab, max_len=cfg.max_len,
                           augment=augment, relabel=relabel)
    val = FormulaDataset(data_dir / "shards" / "validate", vocab, max_len=cfg.max_len)
    if len(train) == 0:
        raise RunError(f"no training images in {data_dir}/shards/train")
    if relabel is not None and (lacking := lacking_tokens(
            (f for b in train.buckets for f in b.formulas), vocab)):
        raise RunError(f"--label_spelling {cfg.label_spelling} writes {' '.join(lacking)}, "
                       "which the run's vocabulary lacks (built from the labels as they "
                       "were): those targets would be <unk>. Add them to the tokens of "
                       f"{data_dir}/vocab.json, or keep --label_spelling as_is")
    sampler = BucketBatchSampler(train.bucket_items, cfg.batch_size, seed=cfg.seed,
                                 num_replicas=d.world, rank=d.rank, lengths=train.lengths)
    # Loaders get their own generator: creating one would otherwise draw from the global RNG,
    # and a resumed run would then see different dropout masks than an uninterrupted one.
    val_loader = DataLoader(val, collate_fn=collate, pin_memory=d.device.type == "cuda",
                            generator=torch.Generator(),
                            batch_sampler=BucketBatchSampler(
                                val.bucket_items, cfg.batch_size, shuffle=False,
                                num_replicas=d.world, rank=d.rank, lengths=val.lengths))
    d.log(f"data: {len(train)} train / {len(val)} validation images "
          f"({train.skipped_long} train formulas over --max_len {cfg.max_len} left out); "
          f"effective batch {cfg.batch_size * d.world} ({cfg.batch_size} x {d.world}), "
          f"lr {cfg.lr:g}" + (f", augmentation {cfg.augment:g}" if augment else "")
          + (f" ({', '.join(f'{share:g} {what}' for _, what, share in optional)})"
             if optional else "")
          + (f", labels in the {cfg.label_spelling} spelling" if relabel else ""))
    return Data(train, val, sampler, val_loader)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: Schedule, start: Start,
                      sel: Selection, d: Dist) -> None:
    """The resumed run's optimizer and schedule state; a --lr given anew (plateau schedule
    only) replaces the saved rate, and a plateau schedule of the other figure (--select_by
    changed) restarts."""
    ckpt = start.resume
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.restore(ckpt, sel, d.log)
    if "lr" in start.changed:  # the optimizer state carries the old rate: the new one wins
        for group in optimizer.param_groups:
            group["lr"] = start.cfg.lr
