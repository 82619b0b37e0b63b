"""Settings and probes of the machine a run trains on, kept out of `model/` (the model is the
function; which instructions this CPU has, and process-wide math settings, belong to the run).

Only training and the training benchmarks use them: inference runs the model in fp32, without
autocast or TF32, so `im2latex/`, `serve.py` and `inference.py` never import this module.
"""

import ctypes
import sys
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h> parameter numbers


def use_tf32_on_cuda() -> None:
    """Run fp32 matmuls and convolutions on CUDA in TF32 (products rounded to a 10-bit mantissa,
    sums in fp32). The decoder's LSTM, attention and output matmuls stay fp32 under autocast
    (model/im2latex.py says why), and TF32 puts them on the tensor cores, at a precision still
    finer than the bf16 the encoder runs in (rates: docs/performance.md). A process-wide
    setting, so the scripts call it, not the model."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether bf16 autocast of the encoder pays off here: CUDA cards with bf16, and CPUs with
    bf16 instructions (AVX512-BF16 or AMX), where it made a training step faster
    (docs/performance.md). Without them bf16 is emulated and slower, and fp16 would need loss
    scaling."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of handing it back to
    the kernel. Returns whether it applied (False off glibc, where there is no `mallopt`).

    Why: a training step's activation buffers are tens of MB, and their sizes change with each
    batch's length bucket. glibc serves blocks above its mmap threshold (which adapts, but to
    32 MiB at most) with a fresh `mmap` and `munmap`s them when freed, so every step faults its
    pages in again and the kernel zeroes them, worst when two training processes do it at once
    (measured: docs/performance.md). With no mmap'd blocks and no trimming, the heap grows to
    the largest bucket's peak and is reused; the process holds that peak between steps.
    A process-wide setting, so train.py calls it, not the model; another allocator
    (jemalloc by `LD_PRELOAD`) leaves glibc's unused and this call without effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
