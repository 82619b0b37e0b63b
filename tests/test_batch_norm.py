"""Global batch norm for CPU DDP (model/batch_norm.py): two gloo ranks holding parts of a batch,
one of them possibly none, compute the gradients one process computes on the whole batch."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Im2Latex, ModelConfig
from model.batch_norm import GlobalBatchNorm2d, to_global_batch_norm
from training.distributed import Dist
from training.loop import train_step

TINY = dict(vocab_size=20, emb_dim=16, dec_rnn_h=24, enc_out_dim=32, cnn_widths=(8, 16, 16, 16))
PAD = 0


def _model() -> Im2Latex:
    torch.manual_seed(0)
    return Im2Latex(ModelConfig(**TINY)).train()


def _batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (n, 1, 32, 48), generator=g, dtype=torch.uint8)
    tgt = torch.randint(4, 20, (n, 7), generator=g)
    tgt[0, 5:] = PAD  # formulas of different lengths
    return {"imgs": imgs, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


def _step(model, batch, d) -> dict[str, torch.Tensor]:
    train_step(model, batch, 1.0, d, PAD, chunks=1, amp=False)
    return {k: p.grad.clone() for k, p in getattr(model, "module", model).named_parameters()}


def _rank(rank: int, port: int, split: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    d = Dist("cpu")
    try:
        model = to_global_batch_norm(_model())
        part = slice(0, split) if rank == 0 else slice(split, None)
        batch = {k: v[part] for k, v in _batch().items()}
        grads = _step(DDP(model), batch, d)
        torch.save({"grads": grads, "state": model.state_dict()}, f"{out}.{rank}")
        d.finish()  # as train.py ends: a group torn down while a peer is still in it aborts
    finally:
        d.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback")
@pytest.mark.parametrize("split", [2, 3])  # rank 1 holds 1 image, or none
def test_two_ranks_compute_the_whole_batchs_gradients_and_statistics(split, tmp_path):
    class One:  # training.distributed.Dist of a single process
        world, rank, main, device = 1, 0, True, torch.device("cpu")

        @staticmethod
        def sum(*values):
            return [float(v) for v in values]

    model = _model()
    ref = _step(model, _batch(), One())
    out = tmp_path / "rank.pt"
    mp.start_processes(_rank, args=(_free_port(), split, str(out)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k, g in ref.items():  # DDP has averaged them: the same on both ranks
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
        for k, v in model.state_dict().items():  # running statistics of the whole batch
            torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_outside_a_distributed_run_it_is_plain_batch_norm():
    plain = _model()
    converted = to_global_batch_norm(_model())
    assert any(isinstance(m, GlobalBatchNorm2d) for m in converted.modules())
    assert converted.state_dict().keys() == plain.state_dict().keys()
    batch = _batch()
    torch.testing.assert_close(converted(batch["imgs"], batch["tgt_in"]),
                               plain(batch["imgs"], batch["tgt_in"]))  # fmt: skip
