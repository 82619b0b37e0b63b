"""This process's place in a torchrun launch, and the few collectives training needs.

Sums are all-reduced so that every quantity is the one a single process with the global batch
would compute: that is what makes DDP, micro-batching and one process agree.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    """Rank, world size and device of this process (a world of 1 without torchrun)."""

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

    def log(self, *args, **kwargs) -> None:
        """print on the main process only: one copy of each line however many ranks run."""
        if self.main:
            print(*args, **kwargs)

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
