import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.dataset import BucketBatchSampler, FormulaDataset, collate
from data.vocab import Vocab

BUCKETS = [list(range(0, 10)), list(range(10, 13)), list(range(13, 40))]


def test_batches_come_from_one_bucket_and_nothing_is_dropped():
    s = BucketBatchSampler(BUCKETS, batch_size=4, seed=1)
    batches = s.batches(0)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(40))
    for b in batches:
        assert len(b) <= 4
        assert len({next(k for k, items in enumerate(BUCKETS) if i in items) for i in b}) == 1


def test_order_is_a_function_of_seed_and_epoch():
    a = BucketBatchSampler(BUCKETS, 4, seed=1)
    b = BucketBatchSampler(BUCKETS, 4, seed=1)
    assert a.batches(3) == b.batches(3)
    assert a.batches(3) != a.batches(4)  # reshuffled every epoch
    assert a.batches(3) != BucketBatchSampler(BUCKETS, 4, seed=2).batches(3)


def test_replicas_slice_the_single_process_batches():
    single = BucketBatchSampler(BUCKETS, 6, seed=5).batches(0)
    parts = [BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=2, rank=r).batches(0)
             for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)  # same number of steps on every rank
    for g, a, b in zip(single, *parts):
        assert [i for i in a + b if i >= 0] == g  # the same images as the single-process step
        assert not set(a) & set(b)


def padded_steps(batches: list[list[int]], lengths: list[int]) -> int:
    """Decoder steps a batch costs: its longest formula, times its rows."""
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_grouping_by_length_cuts_padding_and_still_covers_every_item_in_random_order():
    rng = np.random.default_rng(0)
    items = [list(range(0, 3000)), list(range(3000, 4000))]
    lengths = [int(n) for n in rng.integers(5, 150, size=4000)]
    plain = BucketBatchSampler(items, 32, seed=3).batches(0)
    grouped = BucketBatchSampler(items, 32, seed=3, lengths=lengths, pool=8)
    batches = grouped.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(4000))
    assert all(len({i < 3000 for i in b}) == 1 for b in batches)  # still one bucket per batch
    assert padded_steps(batches, lengths) < 0.6 * padded_steps(plain, lengths)
    assert batches != grouped.batches(1)  # a fresh grouping every epoch
    assert batches == BucketBatchSampler(items, 32, seed=3, lengths=lengths, pool=8).batches(0)
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert np.median(spans) < 20  # within a batch the lengths are close; at random ~130


def test_grouped_replicas_slice_the_grouped_single_process_batches():
    lengths = [(7 * i) % 23 for i in range(40)]
    single = BucketBatchSampler(BUCKETS, 6, seed=5, lengths=lengths).batches(0)
    parts = [BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=2, rank=r,
                                lengths=lengths).batches(0) for r in range(2)]
    for g, a, b in zip(single, *parts, strict=True):
        assert [i for i in a + b if i >= 0] == g


def test_a_batch_smaller_than_the_ranks_gets_padding_entries():
    parts = [BucketBatchSampler([[7]], 4, num_replicas=3, rank=r).batches(0) for r in range(3)]
    assert parts == [[[7]], [[-8]], [[-8]]]


def test_a_slice_of_padding_entries_is_a_batch_of_no_images_of_the_buckets_size():
    out = collate([(np.zeros((4, 6), np.uint8), None)])
    assert out["imgs"].shape == (0, 1, 4, 6) and out["imgs"].dtype == torch.uint8
    assert out["tgt_in"].shape[0] == out["tgt_out"].shape[0] == 0


def test_collate_builds_shifted_targets():
    v = Vocab.build(["a b", "c"])
    batch = [(np.full((8, 16), 255, np.uint8), v.encode("a b")),
             (np.zeros((8, 16), np.uint8), v.encode("c"))]
    out = collate(batch)
    assert out["imgs"].shape == (2, 1, 8, 16) and out["imgs"].dtype == torch.uint8
    a, b, c = v.index["a"], v.index["b"], v.index["c"]
    assert out["tgt_in"].tolist() == [[v.bos_id, a, b], [v.bos_id, c, v.pad_id]]
    assert out["tgt_out"].tolist() == [[a, b, v.eos_id], [c, v.eos_id, v.pad_id]]


def test_workers_started_by_spawn_map_the_shards_instead_of_receiving_the_images(tiny_dataset):
    """spawn / forkserver workers (macOS, Windows, Linux from Python 3.14) get the dataset
    pickled: it must travel as shard paths, and read the same batches."""
    ds = FormulaDataset(tiny_dataset / "shards" / "train", Vocab.load(tiny_dataset / "vocab.json"))
    image_bytes = sum(b.images.nbytes for b in ds.buckets)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < image_bytes / 10
    assert all(isinstance(b.images, np.memmap) for b in copy.buckets)
    order = BucketBatchSampler(ds.bucket_items, 8, seed=0).batches(0)[:4]
    batches = [list(DataLoader(ds, batch_sampler=order, collate_fn=collate, **kw))
               for kw in ({}, {"num_workers": 1, "multiprocessing_context": "spawn"})]
    for a, b in zip(*batches, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
