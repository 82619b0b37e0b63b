"""Train an im2latex model on a preprocessed dataset.

    python train.py --data_path DIR --save_dir runs/x                    # new run
    python train.py --data_path DIR --save_dir runs/x --from_check_point --epoches 20   # resume
    python train.py --data_path NEW --save_dir runs/ft --init_from runs/x/best.pt       # fine-tune

The run can be killed at any moment: `last.pt` is rewritten atomically every `--save_every`
steps and at each epoch's end with the model, optimizer, scheduler, RNG states and position in
the epoch, and the batch order is a pure function of (seed, epoch), so `--from_check_point`
(`--resume`) continues exactly where the kill happened and ends with the same weights. At an
epoch's end `best.pt` and the log row follow `last.pt`, which carries them, so a kill between
those writes is made good on resume. A loss that turns non-finite stops the run before the
optimizer step. Run under torchrun for several processes (DDP).
"""

from __future__ import annotations

import sys

import torch

from data.shards import ShardError
from data.vocab import VocabError
from model.checkpoint import LAST, CheckpointError, remove_stale_temps
from model.selection import Best, Selection
from training import RunError
from training.config import TrainConfig, parse_args
from training.distributed import Dist
from training.loop import Trainer, end_epoch, train_one_epoch, validate
from training.runtime import bf16_is_native, keep_freed_memory, use_tf32_on_cuda
from training.schedule import make_schedule
from training.start import load_data, place, restore_optimizer, start_run, wrap
from training.state import RunState


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_args(argv, description=__doc__)
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = Dist(cfg.device)
    try:
        try:
            train(cfg, given, d)
        except RunError as e:
            d.log(f"error: {e}", file=sys.stderr)
            return 1
        d.finish()
        return 0
    finally:
        d.close()


def train(cfg: TrainConfig, given: frozenset[str], d: Dist) -> None:
    if d.device.type == "cuda":
        use_tf32_on_cuda()
    amp = cfg.amp == "on" or (cfg.amp == "auto" and bf16_is_native(d.device))
    if d.main and cfg.save_dir.is_dir():
        for tmp in remove_stale_temps(cfg.save_dir):
            d.log(f"note: removed {tmp}, left by a process killed while writing it")

    # the model and its vocabulary: new, fine-tuned from --init_from, or the run continued
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    start = start_run(cfg, given, d)
    cfg = start.cfg  # resumed: the run's own options, except those given now
    model = place(start.model, cfg, d)
    optimizer = model.configure_optimizer(cfg.lr)
    net = wrap(model, d)
    trainable = sum(p.numel() for p in optimizer.param_groups[0]["params"])
    d.log(f"model: {trainable / 1e6:.2f}M trainable parameters, vocabulary {len(start.vocab)}, "
          f"device {d.device}, {d.world} process(es), bf16 encoder {'on' if amp else 'off'}")

    data = load_data(cfg, d, start.vocab)
    sel = Selection.from_choice(cfg.select_by, cfg.early_stop, len(data.val) > 0)
    d.log(f"selection: best.pt, the learning-rate plateau and early stopping follow {sel.key}"
          + (f"; stop after {sel.patience} epochs without improvement" if sel.patience else
             "; no early stop") + ("" if len(data.val) else " (no validation images: the "
                                   "training loss stands in)"))
    cfg, scheduler = make_schedule(optimizer, cfg, sel, len(data.sampler), d.log)

    # where the run stands: its start, or the checkpoint's epoch, step, best and RNG states
    torch.manual_seed(cfg.seed + d.rank)  # different dropout masks per rank
    state = RunState(Best(sel.key))
    if start.resume is not None:
        restore_optimizer(optimizer, scheduler, start, sel, d)
        state = RunState.restore(start.resume, sel, d, cfg.save_dir, d.log)
        d.log(f"resumed from {cfg.save_dir / LAST}: epoch {state.epoch + 1}, step {state.step}")

    # the epochs: train, validate, schedule, checkpoint, log; until --epoches, a stop by
    # --max_steps or --max_minutes, or --early_stop
    t = Trainer(cfg, d, model, net, start.vocab, optimizer, scheduler, sel, amp)
    while state.epoch < cfg.epochs:
        if sel.spent(state.epoch, state.best.epoch):  # also a run resumed after its last epoch
            d.log(sel.stop_message(state.epoch, state.best.epoch), flush=True)
            break
        epoch = train_one_epoch(t, state, data)
        if not epoch.complete:
            break
        metrics = validate(model, data.val_loader, d, amp, start.vocab.pad_id)
        end_epoch(t, state, metrics, epoch.data_wait)
        if epoch.stop:
            break


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (VocabError, ShardError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
