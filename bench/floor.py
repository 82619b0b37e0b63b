"""The arithmetic floor of a step: how fast the hardware could run the work the step asks of it.

A measured step time means little alone: 4 s per batch is good or bad depending on how much work
there is.  So the step is run once under `StepCount`, which watches every tensor operation it
dispatches (forward and backward) and counts

  flops    multiply-adds x 2 of the matmuls and convolutions (torch.utils.flop_counter's formulas),
           split by dtype (the bf16 encoder and the fp32 decoder run at different peak rates);
  bytes    each operation reading its inputs once and writing its output once: the traffic an
           unfused kernel cannot avoid (views and fresh allocations move nothing);
  ops      tensor operations that do work: on a GPU each is at least one kernel launch;
  syncs    host synchronisations (`.item()`, `bool(tensor)`): each stalls the host until the
           device has finished everything queued.

`machine_rates` measures the device's matmul rate (per dtype) and memory bandwidth with the same
settings the step runs under, and `floor` divides one by the other: operations over the measured
rate, bytes over the measured bandwidth.  A step can be no faster than the larger of the two;
how far the measured time is above it says how much is left to win and where (a step far above
both floors on a GPU is bound by kernel launches: `ops` x a few microseconds).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten
NO_TRAFFIC = {aten.empty, aten.empty_like, aten.empty_strided, aten.detach, aten.alias,
              aten.lift_fresh, aten._local_scalar_dense}  # fmt: skip


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel must touch to read or write `t`: broadcast (stride-0) dims count once."""
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)


class StepCount(TorchDispatchMode):
    """Counts what the operations dispatched inside `with StepCount() as c:` ask of the device.

    With a `ModuleTracker` entered around the step, `parts` also splits the work by the model's
    top-level submodule (forward and backward together), so the floor says which part to
    speed up; work outside them (the loss, the optimizer) is "other"."""

    def __init__(self, tracker: ModuleTracker | None = None) -> None:
        super().__init__()
        self.flops: Counter = Counter()  # dtype name -> FLOPs
        self.syncs = 0
        self.tracker = tracker
        self.parts: dict[str, Counter] = defaultdict(Counter)  # part -> flops, bytes, ops

    @property
    def bytes(self) -> int:
        return sum(p["bytes"] for p in self.parts.values())

    @property
    def ops(self) -> int:
        return sum(p["ops"] for p in self.parts.values())

    def _part(self) -> str:
        # ModuleTracker names modules "Root.child.grandchild": the parts are the root's children
        names = [n for n in self.tracker.parents if n.count(".") == 1] if self.tracker else []
        return names[0].split(".")[1] if names else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            self.syncs += 1
        if func.is_view or packet in NO_TRAFFIC:
            return out
        reads = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                 if isinstance(t, torch.Tensor)]  # fmt: skip
        writes = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(map(distinct_bytes, reads)) + sum(map(distinct_bytes, writes))
        flops = 0
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        if flops:
            dtype = writes[0].dtype if writes else torch.float32
            self.flops[str(dtype).removeprefix("torch.")] += flops
        self.parts[self._part()].update(flops=flops, bytes=moved, ops=1)
        return out


def count_step(step: Callable[[], object]) -> StepCount:
    with ModuleTracker() as tracker, StepCount(tracker) as count:
        step()
    return count


def _best_time(fn: Callable[[], object], sync: Callable[[], None], reps: int) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def machine_rates(device: torch.device | str, dtypes: list[str]) -> dict[str, float]:
    """Measured FLOP/s of a large square matmul in each dtype, and bytes/s of a large copy.

    Sizes are chosen to reach the device's steady state (matrices far above cache blocking,
    a copy far above the last-level cache: 256 MiB)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 8192 if cuda else 1024
    rates = {}
    for name in dtypes:
        a, b = torch.randn(2, n, n, device=device).to(getattr(torch, name))
        rates[f"flops_{name}"] = (
            2 * n**3 / _best_time(partial(torch.mm, a, b), sync, 5 if cuda else 3)
        )
    src = torch.empty(2**26, device=device)  # 256 MiB of float32
    dst = torch.empty_like(src)
    rates["bytes"] = 2 * src.nbytes / _best_time(partial(dst.copy_, src), sync, 10)
    return rates


def floor(count: StepCount, rates: dict[str, float]) -> dict[str, float]:
    """Seconds the counted work needs at the measured rates, each bound alone, and the larger."""
    compute = sum(f / rates[f"flops_{dtype}"] for dtype, f in count.flops.items())
    memory = count.bytes / rates["bytes"]
    return {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory)}


def step_floor(step: Callable[[], object], device: torch.device | str) -> dict:
    """Everything `describe_floor` prints, for one step: counts, measured rates, floors."""
    count = count_step(step)
    rates = machine_rates(device, sorted(count.flops) or ["float32"])
    return {"flops": dict(count.flops), "bytes": count.bytes, "ops": count.ops,
            "syncs": count.syncs, "parts": {k: dict(v) for k, v in count.parts.items()},
            "rates": rates, **floor(count, rates)}  # fmt: skip


def describe_floor(r: dict, measured_s: float) -> str:
    """Two lines: the floor against the measured time, and the work split by model part."""
    flops = " + ".join(f"{f / 1e9:.1f} GFLOP {d} at {r['rates'][f'flops_{d}'] / 1e12:.2f} TFLOP/s"
                       for d, f in sorted(r["flops"].items()))  # fmt: skip
    return (
        f"  floor: {flops} = {r['compute_s'] * 1e3:.1f} ms; "
        f"{r['bytes'] / 1e9:.2f} GB at {r['rates']['bytes'] / 1e9:.1f} GB/s = "
        f"{r['memory_s'] * 1e3:.1f} ms; {r['ops']} tensor ops, {r['syncs']} host syncs; "
        f"measured {measured_s * 1e3:.1f} ms = {measured_s / r['floor_s']:.1f}x the floor\n"
        "  by part (forward + backward): " + "; ".join(
            f"{name} {p['flops'] / 1e9:.1f} GFLOP, {p['bytes'] / 1e9:.2f} GB, {p['ops']} ops"
            for name, p in sorted(r["parts"].items(), key=lambda kv: -kv[1]["bytes"])
        )
    )
