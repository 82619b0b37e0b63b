"""Im2Latex: CNN encoder + attention LSTM decoder, the top-level module and its config.

Images come in as B x 1 x H x W, uint8 (0..255, white background) or float already in [0, 1];
the encoder turns them into L = H' x W' feature vectors (B x L x C), optionally tagged with 2-D
position features, and the decoder reads them with attention.

Mixed precision (`amp=True`): only the CNN runs under autocast (bf16 on CPU, bf16 or fp16 on CUDA);
its output is cast back to fp32 and the recurrent decoder always runs in fp32, where 100+ steps
of bf16 LSTM state would drift and where bf16 buys nothing on CPU (the attention is
memory-bound and its sigmoid is slower in bf16).  The CNN is about half the training step and
runs much faster in bf16 on CPUs with AVX512-BF16 or AMX (docs/performance.md).  On CUDA with
fp16 use a GradScaler.  Whether a machine has native bf16, and TF32, are the run's business:
training/runtime.py.
"""

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.decoder import Decoder
from model.encoder import Encoder
from model.position import add_position_features
from model.search import MAX_LEN, Decoded, beam_search, greedy_search


@dataclass
class ModelConfig:
    """The model's shape. Its defaults are the only ones: train.py's flags are made from these
    fields (the `help` of a field's metadata is its flag's), and Encoder and Decoder take every
    size from here."""

    vocab_size: int
    emb_dim: int = 80
    dec_rnn_h: int = 512
    enc_out_dim: int = 512
    cnn_widths: tuple[int, ...] = field(default=(64, 128, 256, 256), metadata={
        "help": "channels of the first four conv layers (the fifth is --enc_out_dim)"})
    add_position_features: bool = False
    dropout: float = 0.0
    image_scale: float = field(default=1.0, metadata={
        "help": "the encoder resizes images by this factor first (0.5: ~4x cheaper)"})
    batch_norm: bool = field(default=True, metadata={
        "help": "without: the plain conv stack, as luopeixiang/im2latex (with batch norm, an "
                "out-of-memory retry in micro-batches is not exactly the whole batch; "
                "model/encoder.py says why it is the default)"})

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints load with torch.load(weights_only=True)."""
        d = asdict(self)
        d["cnn_widths"] = list(self.cnn_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d.setdefault("batch_norm", False)  # saved before the field existed: the plain stack
        if "cnn_widths" in d:
            d["cnn_widths"] = tuple(d["cnn_widths"])
        return cls(**d)


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The autocast dtype used for `amp=True` on this device: bf16 unless a CUDA card lacks it
    (fp16 then). A choice the forward pass makes, so it stays with the model; whether amp pays
    off on this machine is training/runtime.py's `bf16_is_native`."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Im2Latex(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.cnn_widths, cfg.enc_out_dim, in_channels=1,
                               batch_norm=cfg.batch_norm)
        # channels-last (N x H x W x C in memory): oneDNN's and cuDNN's native layout for bf16
        # convolutions, so no layout conversion runs around each one (the step's gain:
        # docs/performance.md, "Channels-last encoder").
        self.encoder.to(memory_format=torch.channels_last)
        self.decoder = Decoder(
            cfg.vocab_size, cfg.emb_dim, cfg.dec_rnn_h, cfg.enc_out_dim, cfg.dropout
        )
        self.encoder_frozen = False

    def freeze_encoder(self) -> None:
        """Train the decoder only (fine-tuning on little data). Freezing the weights is not
        enough: batch norm in training mode would still move its running statistics, so the
        encoder stays in eval mode from now on, whatever `train()` is called with."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder_frozen = True
        self.encoder.eval()

    def train(self, mode: bool = True) -> "Im2Latex":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def configure_optimizer(self, lr: float) -> torch.optim.Adam:
        """Adam over the trainable weights (after `freeze_encoder`, the decoder's), fused into a
        few kernels per step where PyTorch has that for the device: on CPU one pass over all
        weights instead of a Python loop over them (timings: docs/performance.md, "Fused
        Adam"), and on a GPU it reads no step counter back to the host, where the loop syncs
        once per weight tensor."""
        params = [p for p in self.parameters() if p.requires_grad]
        fused = params[0].device.type in ("cpu", "cuda")
        return torch.optim.Adam(params, lr=lr, fused=fused or None)

    def _encode(self, imgs: Tensor, amp: bool = False) -> tuple[Tensor, tuple[int, int]]:
        """imgs B x 1 x H x W -> (features B x L x C in fp32, grid size (H', W'))."""
        if imgs.dim() != 4 or imgs.shape[1] != 1:
            raise ValueError(f"expected images B x 1 x H x W, got {tuple(imgs.shape)}")
        dtype = self.decoder.W_out.weight.dtype  # the model's own precision, fp32 normally
        x = imgs.to(dtype) / 255.0 if imgs.dtype == torch.uint8 else imgs.to(dtype)
        if self.cfg.image_scale != 1.0:  # a cheaper model reads smaller images (area average)
            x = F.interpolate(x, scale_factor=self.cfg.image_scale, mode="area")
        with torch.autocast(x.device.type, dtype=amp_dtype(x.device), enabled=amp):
            feats = self.encoder(x)  # B x C x H' x W'
        feats = feats.to(dtype).permute(0, 2, 3, 1)  # B x H' x W' x C
        if self.cfg.add_position_features:
            feats = add_position_features(feats)
        batch, height, width, channels = feats.shape
        return feats.reshape(batch, height * width, channels), (height, width)

    def encode(self, imgs: Tensor, amp: bool = False) -> Tensor:
        """imgs B x 1 x H x W (uint8 or float) -> encoder outputs B x L x C."""
        return self._encode(imgs, amp)[0]

    def forward(
        self,
        imgs: Tensor,
        tgt_in: Tensor,
        teacher_forcing: float = 1.0,
        generator: torch.Generator | None = None,
        amp: bool = False,
        image_of_row: Tensor | None = None,
    ) -> Tensor:
        """Training pass: imgs B x 1 x H x W, tgt_in B x T (<s> first) -> raw logits B x T x V.

        teacher_forcing is the scheduled-sampling epsilon: at each step t > 0 each example feeds
        the true previous token with that probability, else the model's own previous argmax
        (coins drawn from `generator`).  image_of_row (R, optional): tgt_in is then R x T and
        row r reads image image_of_row[r], so several sequences of an image share one encoder
        pass (sequence-level training scores K samples per image: training/sequence.py).
        """
        enc = self.encode(imgs, amp)
        if image_of_row is not None:
            enc = enc.index_select(0, image_of_row)  # R x L x C; gradients sum per image
        with torch.autocast(enc.device.type, enabled=False):
            return self.decoder(enc, tgt_in, teacher_forcing, generator)

    @torch.no_grad()
    def greedy(
        self,
        imgs: Tensor,
        bos: int,
        eos: int,
        max_len: int = MAX_LEN,
        return_attention: bool = False,
        amp: bool = False,
    ) -> Decoded:
        """Argmax decoding; with return_attention, Decoded.attention is B x T x H' x W'."""
        enc, (height, width) = self._encode(imgs, amp)
        with torch.autocast(enc.device.type, enabled=False):
            out = greedy_search(self.decoder, enc, bos, eos, max_len, return_attention)
        if out.attention is not None:
            out.attention = out.attention.view(*out.attention.shape[:2], height, width)
        return out

    @torch.no_grad()
    def beam_search(
        self,
        imgs: Tensor,
        bos: int,
        eos: int,
        max_len: int = MAX_LEN,
        beam_size: int = 5,
        length_norm: float = 1.0,
        amp: bool = False,
    ) -> Decoded:
        """Batched beam search; picks the best hypothesis by score / length ** length_norm."""
        enc = self.encode(imgs, amp)
        with torch.autocast(enc.device.type, enabled=False):
            return beam_search(self.decoder, enc, bos, eos, max_len, beam_size, length_norm)

    def extend_vocab(self, new_size: int) -> None:
        """Grow the embedding and output layers to new_size tokens, keeping the old rows (for
        fine-tuning with new tokens).  Re-create the optimizer afterwards: the parameters are new.
        """
        self.decoder.extend_vocab(new_size)
        self.cfg = replace(self.cfg, vocab_size=new_size)
