"""Bucketed dataset and batch sampler over memory-mapped shards.

Every batch comes from one size bucket, so images are never padded to the batch maximum and
the encoder sees no blank margins it would have to learn to ignore. The batch order is a pure
function of (seed, epoch), which is what lets a resumed run see exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data.layout import MAX_TRAIN_TOKENS
from data.shards import Bucket, load_split
from data.vocab import Vocab

__all__ = ["MAX_TRAIN_TOKENS", "BucketBatchSampler", "FormulaDataset", "collate"]



class FormulaDataset(Dataset):
    """(image, token ids) pairs of one split. Index `i` addresses the concatenated buckets.

    Formulas longer than `max_len` tokens are left out (and counted in `skipped_long`), since the
    decoder is trained and evaluated with that cap; nothing else is dropped.

    `augment(image, epoch, index)`, if given, replaces each training image (not padding
    entries) by one of the same shape; it is a function of `epoch` (see `set_epoch`) and the
    index only, so that which worker loads an item never changes what it looks like.

    `relabel(formula)`, if given, rewrites each formula once, when the split is loaded (e.g.
    data.spelling.respell: one spelling for what typesets the same); `formula(i)`, the targets
    and the length limit all see the rewritten form, which is what the model is trained on."""

    def __init__(self, shard_dir: str | Path, vocab: Vocab, max_len: int | None = None,
                 augment: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
                 relabel: Callable[[str], str] | None = None):
        self.buckets: list[Bucket] = load_split(shard_dir)
        if relabel is not None:
            for bucket in self.buckets:
                bucket.formulas = [relabel(f) for f in bucket.formulas]
        self.vocab = vocab
        self.augment, self.epoch = augment, 0
        self.items: list[tuple[int, int]] = []  # (bucket, row)
        self.bucket_items: list[list[int]] = []  # global indices per bucket
        self.lengths: list[int] = []  # tokens per item, for grouping batches by length
        self.skipped_long = 0
        for b, bucket in enumerate(self.buckets):
            ids = []
            for r, f in enumerate(bucket.formulas):
                n_tokens = len(f.split())
                if max_len is not None and n_tokens > max_len:
                    self.skipped_long += 1
                    continue
                ids.append(len(self.items))
                self.items.append((b, r))
                self.lengths.append(n_tokens)
            self.bucket_items.append(ids)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Before a loader for `epoch` is made: its workers take a copy of the dataset."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[np.ndarray, list[int] | None]:
        """Image and token ids; a padding entry `-1 - i` (see BucketBatchSampler) gives image
        `i` with no targets."""
        b, r = self.items[i if i >= 0 else -1 - i]
        bucket = self.buckets[b]
        ids = self.vocab.encode(bucket.formulas[r]) if i >= 0 else None
        img = np.asarray(bucket.images[r])
        if self.augment is not None and ids is not None:
            img = self.augment(img, self.epoch, i)
        return img, ids

    def formula(self, i: int) -> str:
        b, r = self.items[i]
        return self.buckets[b].formulas[r]

    def name(self, i: int) -> str:
        b, r = self.items[i]
        return self.buckets[b].names[r]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices from one bucket at a time, shuffled per epoch, none dropped.

    With `num_replicas > 1` the global batches (`batch_size * num_replicas` images) are drawn
    exactly as a single process with that batch size would draw them, and each is cut into one
    slice per rank, so a distributed step trains on the same images as the single-process
    step. Every rank runs the same number of steps. A slice left empty (a bucket's last batch
    smaller than the number of ranks) is a *padding entry*: `-1 - i` for an index `i` of the
    batch, which `collate` turns into a batch of no images (of the bucket's size), so that the
    rank takes part in the step's collectives while adding nothing to the loss, the gradient
    or the batch-norm statistics.

    With `lengths` (tokens per index), each bucket's shuffled items are taken `pool` batches at
    a time and sorted by formula length before being cut into batches. A batch costs the
    decoder as many steps as its longest formula, so mixing lengths at random spends much of
    the decoder's work on padding (the shares measured: docs/performance.md, "Length-grouped
    batches"); the shuffle before pooling and the shuffle of the batches keep the order random
    from epoch to epoch."""

    def __init__(self, bucket_items: Sequence[Sequence[int]], batch_size: int,
                 shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 lengths: Sequence[int] | None = None, pool: int = 32):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.bucket_items = [list(b) for b in bucket_items if len(b)]
        self.lengths, self.pool = lengths, max(1, pool)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches together, deterministic in (seed, epoch)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        size = self.batch_size * self.num_replicas
        out = []
        for items in self.bucket_items:
            items = list(items)
            if self.shuffle:
                rng.shuffle(items)
            if self.lengths is not None:
                span = size * self.pool
                items = [i for p in range(0, len(items), span)
                         for i in sorted(items[p:p + span], key=self.lengths.__getitem__)]
            out += [items[i:i + size] for i in range(0, len(items), size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's slice of every global batch for `epoch`."""
        out = []
        for batch in self.global_batches(epoch):
            k, n = self.rank, self.num_replicas
            per = -(-len(batch) // n)  # ceil: slices as even as the batch allows
            mine = batch[k * per:(k + 1) * per]
            out.append(mine or [-1 - batch[0]])
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch))


def collate(batch: Sequence[tuple[np.ndarray, list[int] | None]], bos: int = Vocab.bos_id,
            eos: int = Vocab.eos_id, pad: int = Vocab.pad_id) -> dict[str, torch.Tensor]:
    """Stack one bucket's images (uint8, B x 1 x H x W) and build decoder input/target.

    tgt_in = `<s> y1 .. yn`, tgt_out = `y1 .. yn </s>`, both padded with `<pad>` to the
    longest formula in the batch. Padding entries (ids None) are left out: a batch of only
    those has B = 0."""
    shape = batch[0][0].shape
    batch = [(img, ids) for img, ids in batch if ids is not None]
    imgs = torch.from_numpy(np.stack([img for img, _ in batch]) if batch
                            else np.empty((0, *shape), np.uint8))[:, None]  # B x 1 x H x W
    T = max((len(ids) for _, ids in batch), default=0) + 1
    tgt_in = torch.full((len(batch), T), pad, dtype=torch.long)
    tgt_out = torch.full((len(batch), T), pad, dtype=torch.long)
    for i, (_, ids) in enumerate(batch):
        seq = torch.tensor(ids, dtype=torch.long)
        tgt_in[i, 0] = bos
        tgt_in[i, 1:len(ids) + 1] = seq
        tgt_out[i, :len(ids)] = seq
        tgt_out[i, len(ids)] = eos
    return {"imgs": imgs, "tgt_in": tgt_in, "tgt_out": tgt_out}
