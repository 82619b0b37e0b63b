"""Settings and probes of the machine a run trains on, kept out of `model/` (the model is the
function; which instructions this CPU has, and process-wide math settings, belong to the run).

Only training and the training benchmarks use them: inference runs the model in fp32, without
autocast or TF32, so `im2latex/`, `serve.py` and `inference.py` never import this module.
"""

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


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
