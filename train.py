"""Train an im2latex model on a preprocessed dataset.

    python train.py --data_path DIR --save_dir runs/x                    # new run
    python train.py --data_path DIR --save_dir runs/x --from_check_point --epoches 20   # resume
    python train.py --data_path NEW --save_dir runs/ft --init_from runs/x/best.pt       # fine-tune

The run can be killed at any moment: `last.pt` is rewritten atomically every `--save_every`
steps and at each epoch's end with the model, optimizer, scheduler, RNG states and position in
the epoch, and the batch order is a pure function of (seed, epoch), so `--from_check_point`
continues exactly where the kill happened and ends with the same weights.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.shards import ShardError
from data.vocab import Vocab, VocabError
from model.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.im2latex import Im2Latex, ModelConfig
from model.sampling import teacher_forcing_ratio

# Flags that define a run: --from_check_point takes them from the checkpoint unless they are
# given on the command line with a non-default value.
RUN_FLAGS = ("lr", "min_lr", "lr_decay", "lr_patience", "clip", "batch_size", "max_len",
             "sample_method", "decay_k", "seed", "freeze_encoder")


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
    # run control
    p.add_argument("--from_check_point", action="store_true",
                   help="resume from the latest checkpoint in --save_dir")
    p.add_argument("--init_from", metavar="CKPT", help="start from these weights (fine-tuning)")
    p.add_argument("--freeze_encoder", action="store_true", help="train the decoder only")
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many steps in total (0: no limit)")
    p.add_argument("--max_minutes", type=float, default=0,
                   help="stop (after checkpointing) after this many minutes (0: no limit)")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps")
    p.add_argument("--print_freq", type=int, default=100, help="log to stdout every N steps")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def restore_run_flags(args: argparse.Namespace, saved: dict) -> None:
    """Continue a run with the settings it was started with; explicit changes win."""
    parser = get_parser()
    for key in RUN_FLAGS:
        if key not in saved:
            continue
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, saved[key])
        elif getattr(args, key) != saved[key]:
            print(f"note: --{key} changed from {saved[key]} to {getattr(args, key)} on resume")


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, emb_dim=args.emb_dim, dec_rnn_h=args.dec_rnn_h,
                       enc_out_dim=args.enc_out_dim, cnn_widths=tuple(args.cnn_widths),
                       add_position_features=args.add_position_features, dropout=args.dropout)


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


def sequence_loss(logits: torch.Tensor, tgt_out: torch.Tensor, pad: int) -> torch.Tensor:
    # logits: B x T x V, tgt_out: B x T -> mean cross-entropy over non-pad tokens
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=pad)


@torch.no_grad()
def validate(model: Im2Latex, loader: DataLoader, device: torch.device, amp,
             pad: int) -> dict[str, float]:
    """Teacher-forced loss and token accuracy: cheap enough to run every epoch, and the loss is
    what the learning-rate schedule and best-checkpoint choice follow."""
    model.eval()
    total_loss, total_tok, correct = 0.0, 0, 0
    for batch in loader:
        imgs = batch["imgs"].to(device, non_blocking=True)
        tgt_in, tgt_out = batch["tgt_in"].to(device), batch["tgt_out"].to(device)
        with amp():
            logits = model(imgs, tgt_in)
        mask = tgt_out != pad
        n = int(mask.sum())
        total_loss += float(sequence_loss(logits, tgt_out, pad)) * n
        correct += int(((logits.argmax(-1) == tgt_out) & mask).sum())
        total_tok += n
    model.train()
    loss = total_loss / max(total_tok, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
            "val_acc": correct / max(total_tok, 1)}


def write_log(save_dir: Path, row: dict) -> None:
    """Append the epoch's figures to log.csv and redraw curves.png from the whole file."""
    path = save_dir / "log.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
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


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_dir, save_dir = Path(args.data_path), Path(args.save_dir)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16

    def amp():
        return torch.autocast("cuda", dtype=amp_dtype) if cuda and not args.no_amp \
            else nullcontext()

    # --- the model, the vocabulary, and where we start from
    torch.manual_seed(args.seed)
    resume = None
    if args.from_check_point:
        if not (save_dir / LAST).is_file():
            print(f"error: --from_check_point: no {LAST} in {save_dir}", file=sys.stderr)
            return 1
        resume = load_checkpoint(save_dir / LAST)
        restore_run_flags(args, resume.get("args", {}))
        model, vocab = model_from_checkpoint(resume, source=str(save_dir / LAST))
        model.train()
    else:
        data_vocab = Vocab.load(data_dir / "vocab.json")
        if args.init_from:
            model, vocab = init_from(args.init_from, data_vocab)
        else:
            vocab = data_vocab
            model = Im2Latex(model_config(args, len(vocab)))
    model.to(device)
    if args.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, "
          f"vocabulary {len(vocab)}, device {device}")

    # --- data: one size bucket per batch, order fixed by (seed, epoch)
    train_ds = FormulaDataset(data_dir / "shards" / "train", vocab, max_len=args.max_len)
    val_ds = FormulaDataset(data_dir / "shards" / "validate", vocab, max_len=args.max_len)
    if len(train_ds) == 0:
        print(f"error: no training images in {data_dir}/shards/train", file=sys.stderr)
        return 1
    sampler = BucketBatchSampler(train_ds.bucket_items, args.batch_size, seed=args.seed)
    # Loaders get their own generator: creating one would otherwise draw from the global RNG,
    # and a resumed run would then see different dropout masks than an uninterrupted one.
    val_loader = DataLoader(val_ds, collate_fn=collate, pin_memory=cuda,
                            generator=torch.Generator(),
                            batch_sampler=BucketBatchSampler(val_ds.bucket_items,
                                                             args.batch_size, shuffle=False))
    print(f"data: {len(train_ds)} train / {len(val_ds)} validation images "
          f"({train_ds.skipped_long} train formulas over --max_len {args.max_len} left out)")

    optimizer = torch.optim.Adam(params, lr=args.lr, fused=cuda or None)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=args.lr_decay, patience=args.lr_patience, min_lr=args.min_lr)
    epoch, step_in_epoch, step, best = 0, 0, 0, math.inf
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        epoch, step_in_epoch = resume["epoch"], resume["step_in_epoch"]
        step, best = resume["step"], resume["best_val_loss"]
        print(f"resumed from {save_dir / LAST}: epoch {epoch + 1}, step {step}")

    def checkpoint(path: Path, **extra) -> None:
        save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                         "vocab": vocab.to_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_state(),
                         "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
                         "best_val_loss": best, "args": vars(args), **extra}, path)

    # --- the loop
    started = time.time()
    stop = False
    while epoch < args.epoches and not stop:
        batches = sampler.batches(epoch)
        loader = DataLoader(train_ds, batch_sampler=batches[step_in_epoch:], collate_fn=collate,
                            num_workers=args.workers, pin_memory=cuda,
                            generator=torch.Generator())
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epoches}", disable=args.quiet,
                   initial=step_in_epoch, total=len(batches), dynamic_ncols=True)
        ep_loss, ep_n = 0.0, 0
        for batch in bar:
            imgs = batch["imgs"].to(device, non_blocking=True)
            tgt_in = batch["tgt_in"].to(device, non_blocking=True)
            tgt_out = batch["tgt_out"].to(device, non_blocking=True)
            tf = teacher_forcing_ratio(args.sample_method, step, args.decay_k)
            with amp():
                logits = model(imgs, tgt_in, teacher_forcing=tf)
            loss = sequence_loss(logits, tgt_out, vocab.pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.clip)
            optimizer.step()
            step += 1
            step_in_epoch += 1
            loss_v = loss.item()
            ep_loss, ep_n = ep_loss + loss_v, ep_n + 1
            bar.set_postfix(loss=f"{loss_v:.3f}", ppl=f"{math.exp(min(loss_v, 50)):.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            if args.quiet and step % args.print_freq == 0:
                print(f"epoch {epoch + 1} step {step} loss {loss_v:.4f}", flush=True)
            out_of_time = args.max_minutes and time.time() - started > args.max_minutes * 60
            if (args.max_steps and step >= args.max_steps) or out_of_time:
                stop = True
            if stop or step % args.save_every == 0:
                checkpoint(save_dir / LAST)
            if stop:
                break
        bar.close()
        if stop and step_in_epoch < len(batches):
            print(f"stopped at step {step} (epoch {epoch + 1}, {step_in_epoch}/{len(batches)}); "
                  "continue with --from_check_point")
            break

        # --- end of epoch: validate, schedule, checkpoint, log
        metrics = validate(model, val_loader, device, amp, vocab.pad_id) if len(val_ds) else \
            {"val_loss": ep_loss / max(ep_n, 1), "val_ppl": math.nan, "val_acc": math.nan}
        scheduler.step(metrics["val_loss"])
        epoch, step_in_epoch = epoch + 1, 0
        improved = metrics["val_loss"] < best
        best = min(best, metrics["val_loss"])
        checkpoint(save_dir / LAST)
        if improved:
            checkpoint(save_dir / BEST)
        train_loss = ep_loss / max(ep_n, 1)
        row = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 5),
               "train_ppl": round(math.exp(min(train_loss, 50)), 4),
               **{k: round(v, 5) for k, v in metrics.items()},
               "lr": optimizer.param_groups[0]["lr"],
               "minutes": round((time.time() - started) / 60, 2)}
        write_log(save_dir, row)
        print(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
              f"val ppl {metrics['val_ppl']:.3f}, val token acc {metrics['val_acc']:.4f}"
              + (" (best)" if improved else ""), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (VocabError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
