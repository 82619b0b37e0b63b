"""Train an im2latex model on a preprocessed dataset.

    python train.py --data_path DIR --save_dir runs/x                    # new run
    python train.py --data_path DIR --save_dir runs/x --from_check_point --epoches 20   # resume
    python train.py --data_path NEW --save_dir runs/ft --init_from runs/x/best.pt       # fine-tune

The run can be killed at any moment: `last.pt` is rewritten atomically every `--save_every`
steps and at each epoch's end with the model, optimizer, scheduler, RNG states and position in
the epoch, and the batch order is a pure function of (seed, epoch), so `--from_check_point`
continues exactly where the kill happened and ends with the same weights. At an epoch's end
`best.pt` and the log row follow `last.pt`, which carries them, so a kill between those writes
is made good on resume. A loss that turns non-finite stops the run before the optimizer step.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.augment import Augmenter, parse_level
from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.shards import ShardError
from data.vocab import Vocab, VocabError
from model.batch_norm import to_global_batch_norm
from model.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    model_from_checkpoint,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.im2latex import Im2Latex, ModelConfig, bf16_is_native, use_tf32_on_cuda
from model.sampling import teacher_forcing_ratio
from model.selection import LEGACY, METRICS, Best, Selection

# Flags that define a run: --from_check_point takes them from the checkpoint unless they are
# given on the command line with a non-default value.
RUN_FLAGS = ("lr", "min_lr", "lr_decay", "lr_patience", "clip", "batch_size", "max_len",
             "sample_method", "decay_k", "seed", "freeze_encoder", "augment", "select_by",
             "early_stop")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_path", required=True, help="dataset folder with shards/ and vocab.json")
    p.add_argument("--save_dir", required=True, help="where checkpoints and logs go")
    # model
    p.add_argument("--emb_dim", type=int, default=80)
    p.add_argument("--dec_rnn_h", type=int, default=512)
    p.add_argument("--enc_out_dim", type=int, default=512)
    p.add_argument("--cnn_widths", type=int, nargs="+", default=[64, 128, 256, 256],
                   help="channels of the first four conv layers (the fifth is --enc_out_dim)")
    p.add_argument("--add_position_features", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--no_batch_norm", dest="batch_norm", action="store_false",
                   help="the plain conv stack, as luopeixiang/im2latex (with batch norm, an "
                        "out-of-memory retry in micro-batches is not exactly the whole batch)")
    p.add_argument("--image_scale", type=float, default=1.0,
                   help="the encoder resizes images by this factor first (0.5: ~4x cheaper)")
    # optimisation
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min_lr", type=float, default=3e-5)
    p.add_argument("--lr_decay", type=float, default=0.5)
    p.add_argument("--lr_patience", type=int, default=3)
    p.add_argument("--clip", type=float, default=2.0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_len", type=int, default=150, help="longer formulas are not trained on")
    p.add_argument("--epoches", type=int, default=15, help="train up to this epoch")
    p.add_argument("--sample_method", default="teacher_forcing",
                   choices=["teacher_forcing", "exp", "inv_sigmoid"])
    p.add_argument("--decay_k", type=float, default=1.0,
                   help="scheduled-sampling decay (exp: k<1; inv_sigmoid: k>=1)")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--augment", type=augment_level, default=0.0, metavar="LEVEL",
                   help="augment training images on the fly (data/augment.py): none, light, "
                        "strong or a strength in [0, 1] (default none: older runs reproduce)")
    p.add_argument("--select_by", choices=list(METRICS), default="acc",
                   help="validation figure that picks best.pt and drives the plateau schedule "
                        "and --early_stop: token accuracy (default) or loss (model/selection.py "
                        "says why)")
    p.add_argument("--early_stop", type=epoch_count, default=0, metavar="N",
                   help="stop after N epochs without improvement of --select_by (0: off)")
    # run control
    p.add_argument("--from_check_point", action="store_true",
                   help="resume from the latest checkpoint in --save_dir")
    p.add_argument("--init_from", metavar="CKPT", help="start from these weights (fine-tuning)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --save_dir that already holds one")
    p.add_argument("--freeze_encoder", action="store_true", help="train the decoder only")
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many steps in total (0: no limit)")
    p.add_argument("--max_minutes", type=float, default=0,
                   help="stop (after checkpointing) after this many minutes (0: no limit)")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--print_freq", type=int, default=100, help="log to stdout every N steps")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast of the encoder (auto: where the hardware has bf16)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def augment_level(text: str) -> float:
    try:
        return parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def epoch_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (off) or a number of epochs, got {text!r}")
    return n


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def given_flags(argv: list[str] | None) -> set[str]:
    """The flags written on the command line, told apart from defaults even when a value equals
    its default (`--lr 3e-4` on resume of a run started with `--lr 1e-3`)."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def restore_run_flags(args: argparse.Namespace, saved: dict, given: set[str]) -> set[str]:
    """Continue a run with the settings it was started with; flags given on the command line
    win, and those that differ from the run's are returned (e.g. a lower `--lr` by hand for the
    last epochs)."""
    changed = set()
    for key in RUN_FLAGS:
        if key not in saved:
            continue
        if key not in given:
            setattr(args, key, saved[key])
        elif getattr(args, key) != saved[key]:
            print(f"note: --{key} changed from {saved[key]} to {getattr(args, key)} on resume")
            changed.add(key)
    return changed


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, emb_dim=args.emb_dim, dec_rnn_h=args.dec_rnn_h,
                       enc_out_dim=args.enc_out_dim, cnn_widths=tuple(args.cnn_widths),
                       add_position_features=args.add_position_features, dropout=args.dropout,
                       image_scale=args.image_scale, batch_norm=args.batch_norm)


def init_from(path: str, data_vocab: Vocab) -> tuple[Im2Latex, Vocab]:
    """Weights of a trained model for a new run; tokens the new data has and the model lacks are
    appended to its vocabulary, so their rows are new and every trained row keeps its id."""
    model, vocab = model_from_checkpoint(load_checkpoint(path), source=path)
    extended = vocab.extended(data_vocab.tokens)
    if len(extended) > len(vocab):
        print(f"init_from: vocabulary extended by {len(extended) - len(vocab)} tokens "
              f"({' '.join(extended.tokens[len(vocab):][:10])} ...)")
        model.extend_vocab(len(extended))
    return model.train(), extended


def token_loss_sum(logits: torch.Tensor, tgt_out: torch.Tensor, pad: int) -> torch.Tensor:
    # logits: B x T x V, tgt_out: B x T -> summed cross-entropy over non-pad tokens
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=pad,
                           reduction="sum")


class Dist:
    """This process's place in a torchrun launch (world of 1 without torchrun).

    Sums are all-reduced so that every quantity is the one a single process with the global
    batch would compute: that is what makes DDP, micro-batching and one process agree."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_arg)
        if self.world > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                device = torch.device("cuda", local)
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        self.device = device
        self.main = self.rank == 0

    def sum(self, *values: float | torch.Tensor) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: object) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()

    def finish(self) -> None:
        """Wait for every rank at a normal end. Rank 0 may still be writing the last checkpoint,
        and a gloo group torn down while a peer was still in it aborted a rank at exit
        ("terminate called without an active exception") once in CI. Not on errors: a rank
        that failed would wait here for peers that never come."""
        if self.world > 1:
            dist.barrier()


def train_step(model: torch.nn.Module, batch: dict, tf: float, d: Dist, pad: int,
               chunks: int, amp: bool) -> float:
    """Forward and backward one global batch; returns its mean token loss.

    The loss is a sum over tokens divided by the global token count, so gradients are
    identical whether the batch runs in one piece, in `chunks` micro-batches (after an
    out-of-memory error) or spread over DDP ranks."""
    tgt_out = batch["tgt_out"]
    tokens = d.sum(int((tgt_out != pad).sum()))[0]
    scale = d.world / max(tokens, 1)  # DDP averages gradients over ranks: undo that
    total = 0.0
    pieces = list(zip(*(batch[k].tensor_split(chunks) for k in ("imgs", "tgt_in", "tgt_out"))))
    for i, (imgs, tgt_in, out) in enumerate(pieces):
        last = i == len(pieces) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()
        with sync:
            logits = model(imgs.to(d.device, non_blocking=True),
                           tgt_in.to(d.device, non_blocking=True), teacher_forcing=tf, amp=amp)
            loss_sum = token_loss_sum(logits, out.to(d.device, non_blocking=True), pad)
            (loss_sum * scale).backward()
        total += loss_sum.item()
    return d.sum(total)[0] / max(tokens, 1)


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


def read_log(save_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of the run's log.csv (none when there is no log yet)."""
    path = save_dir / "log.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_log(save_dir: Path, row: dict) -> None:
    """Record the epoch's figures in log.csv, replacing a row of the same epoch, and redraw
    curves.png from the whole file. The file is rewritten atomically, so a kill leaves whole
    rows only."""
    fields, rows = read_log(save_dir)
    # a run resumed by a newer version keeps the columns its log started with
    fields = fields or list(row)
    rows = [r for r in rows if r.get("epoch") != str(row["epoch"])] + [row]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write(save_dir / "log.csv", lambda f: f.write(text.getvalue().encode()))
    plot_log(save_dir)


def plot_log(save_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_log(save_dir)[1]
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [float(r["train_loss"]) for r in rows], "o-", label="train")
    a.plot(ep, [float(r["val_loss"]) for r in rows], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("cross-entropy"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [float(r["val_acc"]) for r in rows], "o-", color="C2")
    b.set_xlabel("epoch"), b.set_ylabel("validation token accuracy"), b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(save_dir / "curves.png", dpi=100)
    plt.close(fig)


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


def resumed_best(resume: dict, sel: Selection, save_dir: Path, log) -> Best:
    """The best so far of the figure the run now follows: stored in the checkpoint, or, for a
    checkpoint saved before --select_by or by the other figure, taken from log.csv."""
    stored = resume.get("best")
    if isinstance(stored, dict) and stored.get("key") == sel.key:
        return Best(sel.key, stored.get("value"), int(stored.get("epoch", 0)))
    best = Best.from_rows(sel, read_log(save_dir)[1], resume["epoch"])
    if sel.key == "val_loss" and math.isfinite(resume["best_val_loss"]):
        best.value = resume["best_val_loss"]  # log.csv's figures are rounded
    found = (f"from log.csv: {best.value} at epoch {best.epoch}" if best.value is not None
             else "no epoch has ended yet")
    log(f"note: the checkpoint holds no best {sel.key}; {found}")
    return best


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Dist(args.device)
    try:
        rc = train(args, d, given_flags(argv))
        d.finish()
        return rc
    finally:
        d.close()


def train(args: argparse.Namespace, d: Dist, given: set[str]) -> int:
    data_dir, save_dir = Path(args.data_path), Path(args.save_dir)
    cuda = d.device.type == "cuda"
    if cuda:
        use_tf32_on_cuda()
    amp = args.amp == "on" or (args.amp == "auto" and bf16_is_native(d.device))
    log = print if d.main else (lambda *a, **k: None)
    if d.main and save_dir.is_dir():
        for tmp in remove_stale_temps(save_dir):
            log(f"note: removed {tmp}, left by a process killed while writing it")

    # --- the model, the vocabulary, and where we start from
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    resume, changed = None, set()
    if args.from_check_point:
        if not (save_dir / LAST).is_file():
            print(f"error: --from_check_point: no {LAST} in {save_dir}", file=sys.stderr)
            return 1
        resume = load_checkpoint(save_dir / LAST)
        if d.main:
            finish_epoch_end(save_dir, resume)
        # runs saved before --select_by existed were selected by the loss
        saved = {"select_by": LEGACY, **resume.get("args", {})}
        changed = restore_run_flags(args, saved, given)
        model, vocab = model_from_checkpoint(resume, source=str(save_dir / LAST))
        data_vocab_path = data_dir / "vocab.json"
        data_vocab = Vocab.load(data_vocab_path) if data_vocab_path.is_file() else vocab
        if data_vocab != vocab:
            missing = len(vocab.unknown(data_vocab.tokens))
            log(f"note: {data_vocab_path} differs from the checkpoint's vocabulary; training "
                f"continues with the checkpoint's ({missing} tokens of the data map to <unk>)")
    else:
        if (save_dir / LAST).is_file() and not args.overwrite:
            print(f"error: {save_dir} already holds a run ({LAST}); continue it with "
                  "--from_check_point, or pass --overwrite to start over", file=sys.stderr)
            return 1
        if args.overwrite and d.main:  # an old best.pt or log would pass for this run's
            for name in (LAST, BEST, "log.csv", "curves.png"):
                (save_dir / name).unlink(missing_ok=True)
        data_vocab = Vocab.load(data_dir / "vocab.json")
        if args.init_from:
            model, vocab = init_from(args.init_from, data_vocab)
        else:
            vocab = data_vocab
            model = Im2Latex(model_config(args, len(vocab)))
    model.to(d.device).train()
    if args.freeze_encoder:
        model.freeze_encoder()
    # batch-norm statistics over the global batch, as one process would compute them
    if d.world > 1 and model.cfg.batch_norm:
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # SyncBatchNorm needs CUDA
            model = to_global_batch_norm(model)
    optimizer = model.configure_optimizer(args.lr)
    params = optimizer.param_groups[0]["params"]
    net = DDP(model, device_ids=[d.device] if cuda else None) if d.world > 1 else model
    log(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, "
        f"vocabulary {len(vocab)}, device {d.device}, {d.world} process(es), "
        f"bf16 encoder {'on' if amp else 'off'}")

    # --- data: one size bucket per batch, order fixed by (seed, epoch)
    augment = Augmenter(args.augment, args.seed) if args.augment else None
    train_ds = FormulaDataset(data_dir / "shards" / "train", vocab, max_len=args.max_len,
                              augment=augment)
    val_ds = FormulaDataset(data_dir / "shards" / "validate", vocab, max_len=args.max_len)
    if len(train_ds) == 0:
        print(f"error: no training images in {data_dir}/shards/train", file=sys.stderr)
        return 1
    sampler = BucketBatchSampler(train_ds.bucket_items, args.batch_size, seed=args.seed,
                                 num_replicas=d.world, rank=d.rank, lengths=train_ds.lengths)
    # Loaders get their own generator: creating one would otherwise draw from the global RNG,
    # and a resumed run would then see different dropout masks than an uninterrupted one.
    val_loader = DataLoader(val_ds, collate_fn=collate, pin_memory=cuda,
                            generator=torch.Generator(),
                            batch_sampler=BucketBatchSampler(
                                val_ds.bucket_items, args.batch_size, shuffle=False,
                                num_replicas=d.world, rank=d.rank, lengths=val_ds.lengths))
    log(f"data: {len(train_ds)} train / {len(val_ds)} validation images "
        f"({train_ds.skipped_long} train formulas over --max_len {args.max_len} left out); "
        f"effective batch {args.batch_size * d.world} ({args.batch_size} x {d.world}), "
        f"lr {args.lr:g}" + (f", augmentation {args.augment:g}" if augment else ""))

    sel = Selection.from_choice(args.select_by, args.early_stop, len(val_ds) > 0)
    log(f"selection: best.pt, the learning-rate plateau and early stopping follow {sel.key}"
        + (f"; stop after {sel.patience} epochs without improvement" if sel.patience else
           "; no early stop") + ("" if len(val_ds) else " (no validation images: the "
                                 "training loss stands in)"))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=sel.mode, factor=args.lr_decay, patience=args.lr_patience,
        min_lr=args.min_lr)
    torch.manual_seed(args.seed + d.rank)  # different dropout masks per rank
    epoch, step_in_epoch, step, best_loss, best = 0, 0, 0, math.inf, Best(sel.key)
    carried = 0.0, 0  # the epoch's training-loss sum and steps before a resume
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scheduler"].get("mode", "min") == sel.mode:
            scheduler.load_state_dict(resume["scheduler"])
        else:  # its plateau count and best were of the other figure; the rate is kept
            log(f"note: the plateau schedule restarts, following {sel.key} now")
        if "lr" in changed:  # the optimizer state carries the old rate: the new one wins
            for group in optimizer.param_groups:
                group["lr"] = args.lr
        states = resume["rng"]
        if len(states) == d.world:
            set_rng_state(states[d.rank])
        else:
            log(f"note: checkpoint from {len(states)} process(es), now {d.world}: RNG reseeded")
        epoch, step_in_epoch = resume["epoch"], resume["step_in_epoch"]
        step, best_loss = resume["step"], resume["best_val_loss"]
        best = resumed_best(resume, sel, save_dir, log)
        if step_in_epoch:
            carried = resume.get("ep_loss", 0.0), resume.get("ep_n", 0)
        log(f"resumed from {save_dir / LAST}: epoch {epoch + 1}, step {step}")

    def checkpoint(*paths: Path, epoch_end: dict | None = None) -> None:
        rng = d.gather(rng_state())  # collective: every rank calls it
        if not d.main:
            return
        state = {"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                 "vocab": vocab.to_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": rng, "epoch": epoch,
                 "step_in_epoch": step_in_epoch, "step": step, "best_val_loss": best_loss,
                 "best": best.to_dict(),
                 "ep_loss": ep_loss, "ep_n": ep_n, "args": vars(args)}
        if epoch_end is not None:
            state["epoch_end"] = epoch_end
        for path in paths:
            save_checkpoint(state, path)

    # --- the loop
    started = time.time()
    chunks = 1  # micro-batches per step; doubled when a CUDA step runs out of memory
    stop = False
    while epoch < args.epoches and not stop:
        if sel.spent(epoch, best.epoch):  # here too for a run resumed after its last epoch
            log(sel.stop_message(epoch, best.epoch), flush=True)
            break
        batches = sampler.batches(epoch)
        train_ds.set_epoch(epoch)
        loader = DataLoader(train_ds, batch_sampler=batches[step_in_epoch:], collate_fn=collate,
                            num_workers=args.workers, pin_memory=cuda,
                            generator=torch.Generator())
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epoches}",
                   disable=args.quiet or not d.main, initial=step_in_epoch, total=len(batches),
                   dynamic_ncols=True)
        (ep_loss, ep_n), carried = carried, (0.0, 0)
        seen = 0  # batches this process has had this epoch
        waited = worked = 0.0  # seconds this epoch: for the next batch / on steps
        mark = time.perf_counter()
        for batch in bar:
            arrived = time.perf_counter()
            if seen:  # the first batch also waits for the workers to start: not steady state
                waited += arrived - mark
            tf = teacher_forcing_ratio(args.sample_method, step, args.decay_k)
            while True:
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss = train_step(net, batch, tf, d, vocab.pad_id, chunks, amp)
                    break
                except torch.cuda.OutOfMemoryError:
                    if d.world > 1 or chunks >= len(batch["imgs"]):
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    chunks *= 2
                    log(f"\nout of GPU memory: step {step + 1} retried in {chunks} "
                        f"micro-batches of ~{-(-len(batch['imgs']) // chunks)}")
            norm = torch.nn.utils.clip_grad_norm_(params, args.clip) if args.clip > 0 else 0.0
            # Both should be the same on every rank (the loss is all-reduced, and so are the
            # gradients under DDP); the vote makes sure that all ranks stop at the same step.
            if d.sum(not (math.isfinite(loss) and math.isfinite(norm)))[0] > 0:
                what, value = ("gradient norm", norm) if math.isfinite(loss) else ("loss", loss)
                if d.main:
                    print(f"\nerror: the training {what} became {float(value):g} at step "
                          f"{step + 1} (epoch {epoch + 1}); stopped "
                          f"before the optimizer step, {save_dir / LAST} is left as it was. Try "
                          "a lower --lr or --clip, or check the data", file=sys.stderr)
                return 1
            optimizer.step()
            step += 1
            step_in_epoch += 1
            ep_loss, ep_n, seen = ep_loss + loss, ep_n + 1, seen + 1
            bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            if args.quiet and step % args.print_freq == 0:
                log(f"epoch {epoch + 1} step {step} loss {loss:.4f}", flush=True)
            out_of_time = args.max_minutes and time.time() - started > args.max_minutes * 60
            want_stop = bool((args.max_steps and step >= args.max_steps) or out_of_time)
            stop = d.sum(want_stop)[0] > 0  # all ranks take part, so all stop at one step
            if stop or step % args.save_every == 0:
                checkpoint(save_dir / LAST)
            mark = time.perf_counter()  # every step ends in a host sync: the device is idle now
            if seen > 1:
                worked += mark - arrived
            if stop:
                break
        bar.close()
        data_wait = waited / max(waited + worked, 1e-9)
        if stop and step_in_epoch < len(batches):
            log(f"stopped at step {step} (epoch {epoch + 1}, {step_in_epoch}/{len(batches)}; "
                f"{100 * data_wait:.1f}% of the time waiting for data); continue with "
                "--from_check_point")
            break

        # --- end of epoch: validate, schedule, checkpoint, log
        metrics = validate(model, val_loader, d, amp, vocab.pad_id)
        if math.isnan(metrics["val_loss"]):  # no validation data: follow the training loss
            metrics["val_loss"] = ep_loss / max(ep_n, 1)
        scheduler.step(metrics[sel.key])
        epoch, step_in_epoch = epoch + 1, 0
        improved = sel.improves(metrics[sel.key], best.value)
        if improved:
            best.value, best.epoch = metrics[sel.key], epoch
        best_loss = min(best_loss, metrics["val_loss"])
        train_loss = ep_loss / max(ep_n, 1)
        row = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 5),
               "train_ppl": round(math.exp(min(train_loss, 50)), 4),
               **{k: round(v, 5) for k, v in metrics.items()},
               "lr": optimizer.param_groups[0]["lr"],
               "minutes": round((time.time() - started) / 60, 2),
               "data_wait": round(data_wait, 4), "best_epoch": best.epoch}
        # last.pt first, holding what the writes after it need: a kill between them is
        # repaired on resume (finish_epoch_end)
        checkpoint(save_dir / LAST, *([save_dir / BEST] if improved else []),
                   epoch_end={"row": row, "improved": improved})
        if not d.main:
            continue
        write_log(save_dir, row)
        log(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
            f"val ppl {metrics['val_ppl']:.3f}, val token acc {metrics['val_acc']:.4f}"
            + (" (best)" if improved else "")
            + f"; {100 * data_wait:.1f}% of the time waiting for data", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (VocabError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
