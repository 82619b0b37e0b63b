"""The speed benchmarks run end to end (on toy sizes) and print their summary line last."""

import platform
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = ["--batch", "2", "--steps", "1", "--warmup", "0", "--height", "32", "--width", "64",
        "--threads", "1"]


@pytest.mark.parametrize("script, extra, summary", [
    ("bench/train_speed.py", ["--tgt_len", "5"],
     r"^train_speed: ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x$"),
    ("bench/decode_speed.py", ["--max_len", "5"],
     r"^decode_speed: beam5 ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x, peak RSS ours "
     r"\d+ MB; greedy ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x"),
])
def test_bench_runs_both_sides(script, extra, summary):
    p = subprocess.run([sys.executable, str(ROOT / script), *TINY, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert re.match(summary, lines[-1]), lines[-1]
    assert any("baseline" in ln and "img/s" in ln for ln in lines[:-1])
    if script == "bench/train_speed.py":  # our step's arithmetic floor, below the measured time
        floor = next(ln for ln in lines if ln.strip().startswith("floor:"))
        assert re.search(r"tensor ops, 0 host syncs; measured [\d.]+ ms = [\d.]+x the floor$",
                         floor), floor
        assert float(floor.rsplit("= ", 1)[1].split("x")[0]) >= 1.0, floor


def test_loader_speed_times_each_worker_count():
    p = subprocess.run([sys.executable, str(ROOT / "bench/loader_speed.py"), "--synthetic", "400",
                        "--batches", "4", "--workers", "0", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"loader_speed: workers 0 \d+ img/s, workers 1 \d+ img/s", last), last


MMAPPED_BLOCKS = """
import ctypes, sys
import torch
from training.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t counters
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena ordblks smblks hblks hblkhd "
                                                     "usmblks fsmblks uordblks fordblks keepcost"
                                                     ).split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblks  # blocks mapped at start-up (import torch) stay mapped
x = torch.ones(64, 2**20, dtype=torch.uint8)  # 64 MiB, above glibc's largest mmap threshold
print(kept, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """train.py's allocator setting: without it glibc maps a 64 MiB tensor as a block of its own
    (returned to the kernel when freed, faulted in afresh by the next step); with it, no block
    is mapped, so freed memory stays in the heap for the next step."""
    def mapped(mode: str) -> tuple[str, int]:
        p = subprocess.run([sys.executable, "-c", MMAPPED_BLOCKS, mode], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        kept, blocks = p.stdout.split()
        return kept, int(blocks)

    assert mapped("default")[1] >= 1
    assert mapped("keep") == ("True", 0)


def test_allocator_bench_compares_the_allocators(tiny_model):
    p = subprocess.run([sys.executable, str(ROOT / "bench/allocator.py"), "--batch", "2",
                        "--procs", "1", "--model_path", str(tiny_model)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert re.match(r"^allocator: glibc [\d.]+ img/s \(1\.00x\), glibc kept [\d.]+ img/s "
                    r"\([\d.]+x\)", lines[-1]), lines[-1]
    kept = next(ln for ln in lines if ln.strip().startswith("glibc kept"))
    assert re.search(r"kernel +[\d.]+% of CPU +\d+ minor faults", kept), kept
