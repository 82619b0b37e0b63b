"""Export a checkpoint as two ONNX graphs for `im2latex.onnx_backend` (the torch-free runtime).

    encoder.onnx       images B x 1 x H x W uint8 -> enc B x L x C, keys B x L x A,
                       h0, c0, o0 B x Hd   (everything computed once per image)
    decoder_step.onnx  token R, h, c, o R x Hd, keys B x L x A, enc B x L x C
                       -> logp R x V, h, c, o R x Hd, alpha R x L   (one step, R = B * N rows)

Batch, height and width are dynamic, and so is N, the rows per image (1 for greedy, K for beam
search: the K hypotheses of an image share its keys and encoder output, as in model/search.py).
Written next to them: vocab.json, onnx_model.json (model config, the source checkpoint's
content digest, so a test can tell a stale export from a current one) and, when the source
checkpoint has a calibration made for its weights beside it (im2latex/confidence.py), a copy of
it as calibration.json, so the torch-free runtime reports the same calibrated confidence.

The graphs compute what `Im2Latex._encode`, `Decoder.init_state` and `Decoder.step` compute, in
export-friendly form: the decoder's attention is an autograd Function with a chunked scratch
buffer (training and CPU cache tricks the exporter cannot trace), so `_DecoderStep` writes the
same formula as plain tensor ops; the LSTM cell is spelled out, as one matrix product; the
position features are built from the feature grid's dynamic size with `cat` rather than slice
assignment. `check_export` runs both graphs in onnxruntime against the PyTorch model.

The exporter is torch.onnx's TorchScript one (`dynamo=False`): it traces these small modules
with dynamic axes directly and needs no onnxscript; the graphs are plain fp32 (onnxruntime's CPU
fp16 kernels are slower, not faster).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from im2latex.confidence import calibration_path, find_calibration
from im2latex.onnx_backend import (
    CALIBRATION,
    DECODER_STEP,
    ENCODER,
    FORMAT_VERSION,
    META,
    VOCAB,
    OnnxBackend,
    OnnxModelError,
)
from model.checkpoint import atomic_write, content_digest, load_checkpoint, model_from_checkpoint
from model.decoder import Decoder, DecoderState
from model.im2latex import Im2Latex
from model.position import position_features

OPSET = 17


class _EncoderGraph(nn.Module):
    """uint8 images -> what decoding needs once per image (see the module docstring)."""

    def __init__(self, model: Im2Latex):
        super().__init__()
        self.model = model
        self.register_buffer("inv_timescales", _inv_timescales(model.cfg.enc_out_dim))

    def positions(self, height: Tensor | int, width: Tensor | int, channels: int) -> Tensor:
        """model/position.py's H x W x C signal for a dynamic H, W, built with cat."""
        n = channels // 4

        def timing(length) -> Tensor:
            scaled = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_timescales
            return torch.cat([scaled.sin(), scaled.cos()], dim=1)  # length x 2n

        rows = timing(height)[:, None, :].expand(-1, width, -1)
        cols = timing(width)[None, :, :].expand(height, -1, -1)
        rest = torch.zeros_like(rows[..., :1]).expand(-1, -1, channels - 4 * n)
        return torch.cat([rows, cols, rest], dim=2)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        x = images.float() / 255.0
        if model.cfg.image_scale != 1.0:
            x = F.interpolate(x, scale_factor=model.cfg.image_scale, mode="area")
        feats = model.encoder(x).permute(0, 2, 3, 1)  # B x H' x W' x C
        batch, height, width, channels = feats.shape
        if model.cfg.add_position_features:
            feats = feats + self.positions(height, width, channels)
        enc = feats.reshape(batch, -1, channels)
        decoder = model.decoder
        h, c, o = decoder.init_state(enc)
        return enc, decoder.attention.keys(enc), h, c, o


def _inv_timescales(channels: int) -> Tensor:
    """The n frequencies model/position.py uses for C channels (same formula, same fp32 ops;
    `_check_positions` holds the two together)."""
    n = max(channels // 4, 1)
    log_increment = math.log(1.0e4 / 1.0) / max(n - 1, 1)
    return torch.exp(torch.arange(n, dtype=torch.float32) * -log_increment)[: channels // 4]


def _check_positions(graph: _EncoderGraph, channels: int) -> None:
    for height, width in ((1, 1), (6, 79), (23, 150)):
        if not torch.equal(graph.positions(height, width, channels),
                           position_features(height, width, channels)):
            raise RuntimeError("the export's position features differ from model/position.py's")


class _DecoderStep(nn.Module):
    """`Decoder.step` without the training machinery, for R = B * N rows (N per image).

    Attention as in model/decoder.py: e' = 2 beta . sigmoid(keys + 2 W_2 h), alpha = softmax(e')
    over the L positions, context = alpha @ enc."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        cell = decoder.cell
        # the LSTM cell's two products as one: [y, o, h] @ [W_ih, W_hh]^T
        weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1).t().contiguous()
        self.register_buffer("cell_weight", weight)
        self.register_buffer("cell_bias", (cell.bias_ih + cell.bias_hh).detach())

    def forward(self, token: Tensor, h: Tensor, c: Tensor, o: Tensor, keys: Tensor,
                enc: Tensor) -> tuple[Tensor, ...]:
        d = self.decoder
        x = torch.cat([d.embed(token), o, h], dim=1)  # R x (E + 2 Hd)
        i, f, g, out = (x @ self.cell_weight + self.cell_bias).chunk(4, dim=1)  # torch's order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(out) * torch.tanh(c)
        batch, length, width = keys.shape
        q = (2 * d.attention.W_2(h)).reshape(batch, -1, 1, width)  # B x N x 1 x A
        gates = torch.sigmoid(keys.unsqueeze(1) + q)  # B x N x L x A
        alpha = torch.softmax((gates * d.attention.beta).sum(-1) * 2, dim=-1)  # B x N x L
        rows = token.shape[0]
        context = torch.bmm(alpha, enc).reshape(rows, -1)  # R x C
        o = torch.tanh(d.W_3(torch.cat([h, context], dim=1)))
        logp = torch.log_softmax(d.W_out(o), dim=-1)
        return logp, h, c, o, alpha.reshape(rows, length)


def _example_images(batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    """B x 1 x H x W uint8: white paper with dark strokes (content does not matter)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.full((batch, 1, height, width), 255, dtype=torch.uint8)
    return imgs.masked_fill(torch.rand(imgs.shape, generator=g) < 0.15, 0)


def _export_graphs(model: Im2Latex, folder: Path) -> None:
    encoder = _EncoderGraph(model).eval()
    _check_positions(encoder, model.cfg.enc_out_dim)
    step = _DecoderStep(model.decoder).eval()
    images = _example_images(2, 40, 160)
    with torch.no_grad():
        enc, keys, h, c, o = encoder(images)
    token = torch.ones(2 * 3, dtype=torch.long)  # three rows per image: N stays dynamic
    state = [s.repeat_interleave(3, dim=0) for s in (h, c, o)]
    rows, images_l = {0: "rows"}, {0: "batch", 1: "positions"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (images,), str(folder / ENCODER), dynamo=False, opset_version=OPSET,
            input_names=["images"], output_names=["enc", "keys", "h", "c", "o"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "enc": images_l,
                          "keys": images_l, "h": {0: "batch"}, "c": {0: "batch"},
                          "o": {0: "batch"}})
        torch.onnx.export(
            step, (token, *state, keys, enc), str(folder / DECODER_STEP), dynamo=False,
            opset_version=OPSET, input_names=["token", "h", "c", "o", "keys", "enc"],
            output_names=["logp", "h_out", "c_out", "o_out", "alpha"],
            dynamic_axes={"token": rows, "h": rows, "c": rows, "o": rows, "keys": images_l,
                          "enc": images_l, "logp": rows, "h_out": rows, "c_out": rows,
                          "o_out": rows, "alpha": {0: "rows", 1: "positions"}})


def check_export(folder: Path, model: Im2Latex, tolerance: float = 1e-3) -> float:
    """Run the exported graphs in onnxruntime next to the PyTorch model on images of two sizes
    (several rows per image, as beam search has) -> the largest log-prob difference, or
    RuntimeError when it exceeds `tolerance` (a wrong graph is off by whole units)."""
    backend = OnnxBackend(folder, threads=1)
    worst = 0.0
    for batch, height, width in ((1, 64, 320), (3, 50, 200)):
        images = _example_images(batch, height, width, seed=height)
        memory = backend.encode(images.numpy())
        with torch.no_grad():
            enc = model.encode(images)
            state = DecoderState(*(s.repeat_interleave(2, dim=0)
                                   for s in model.decoder.init_state(enc)))
            keys = model.decoder.attention.keys(enc)
            prev = torch.arange(batch * 2) % len(backend.vocab)
            state, _ = model.decoder.step(state, prev, keys, enc)
            want = torch.log_softmax(model.decoder.W_out(state.o), dim=-1).numpy()
        rows = [np.repeat(memory[n], 2, axis=0) for n in ("h", "c", "o")]
        got, _ = backend.step(prev.numpy(), rows, memory)
        worst = max(worst, float(np.abs(got - want).max()),
                    float(np.abs(memory["enc"] - enc.numpy()).max()))
    if not worst <= tolerance:
        raise RuntimeError(f"the ONNX graphs differ from the PyTorch model by {worst:.2g} "
                           f"(tolerance {tolerance})")
    return worst


def export_onnx(src: str | Path, dst: str | Path) -> dict:
    """Export checkpoint `src` into folder `dst` (replaced whole, never left half-written:
    the folder is built under a temporary name, checked, then renamed into place) -> its meta,
    plus `calibrated` (its calibration was copied) and `calibration_note` (why one found beside
    `src` was not: made for other weights, malformed; None otherwise)."""
    dst = Path(dst)
    if dst.exists() and not (dst / META).is_file():
        raise OnnxModelError(f"{dst}: exists and is not an ONNX model folder; not replacing it")
    ckpt = load_checkpoint(src)  # verified against its stored digest when it has one
    digest = content_digest(ckpt)  # = the stored sha256 (a file from before checksums: computed)
    model, vocab = model_from_checkpoint(ckpt, source=str(src))
    meta = {"format_version": FORMAT_VERSION, "model_config": model.cfg.to_dict(),
            "source": Path(src).name, "source_sha256": digest, "note": ckpt.get("note", ""),
            "epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0), "opset": OPSET,
            "torch": torch.__version__}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _export_graphs(model, tmp)
        vocab.save(tmp / VOCAB)
        text = json.dumps(meta, indent=1) + "\n"
        atomic_write(tmp / META, lambda f: f.write(text.encode()))
        meta["max_diff"] = check_export(tmp, model)
        meta["calibrated"], meta["calibration_note"] = _copy_calibration(src, digest, tmp)
        _replace_folder(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _copy_calibration(src: str | Path, digest: str, folder: Path) -> tuple[bool, str | None]:
    """Copy the calibration beside checkpoint `src` into `folder` when it was made for these
    weights (the file as it is, so the two can be compared) -> (copied, why not)."""
    path = calibration_path(src)
    calibration, note = find_calibration(path, digest)
    if calibration is not None:
        shutil.copyfile(path, folder / CALIBRATION)  # synced with the rest by _replace_folder
    return calibration is not None, note


def _replace_folder(new: Path, dst: Path) -> None:
    """Put folder `new` at `dst`, after syncing its files; an old `dst` is swapped out first."""
    for f in new.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    if dst.exists():
        os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)
