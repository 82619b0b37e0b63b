import numpy as np
import torch

from data.dataset import BucketBatchSampler, collate
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


def test_a_batch_smaller_than_the_ranks_gets_padding_entries():
    parts = [BucketBatchSampler([[7]], 4, num_replicas=3, rank=r).batches(0) for r in range(3)]
    assert parts == [[[7]], [[-8]], [[-8]]]


def test_padding_entries_have_no_targets():
    v = Vocab.build(["a"])
    out = collate([(np.zeros((4, 4), np.uint8), None)])
    assert (out["tgt_out"] == v.pad_id).all()


def test_collate_builds_shifted_targets():
    v = Vocab.build(["a b", "c"])
    batch = [(np.full((8, 16), 255, np.uint8), v.encode("a b")),
             (np.zeros((8, 16), np.uint8), v.encode("c"))]
    out = collate(batch)
    assert out["imgs"].shape == (2, 1, 8, 16) and out["imgs"].dtype == torch.uint8
    a, b, c = v.index["a"], v.index["b"], v.index["c"]
    assert out["tgt_in"].tolist() == [[v.bos_id, a, b], [v.bos_id, c, v.pad_id]]
    assert out["tgt_out"].tolist() == [[a, b, v.eos_id], [c, v.eos_id, v.pad_id]]
