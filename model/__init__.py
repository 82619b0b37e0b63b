"""im2latex model: CNN encoder, attention LSTM decoder, greedy and beam search."""

from model.im2latex import Im2Latex, ModelConfig, amp_dtype
from model.sampling import teacher_forcing_ratio
from model.search import MAX_LEN, Decoded

__all__ = ["MAX_LEN", "Decoded", "Im2Latex", "ModelConfig", "amp_dtype", "teacher_forcing_ratio"]
