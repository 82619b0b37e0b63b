"""The Python API: formula images in, LaTeX out, in a few lines.

    from im2latex import Reader
    reader = Reader()                            # the shipped model, PyTorch, on the CPU
    print(reader("formula.png").latex)           # one image -> a Prediction
    for p in reader([png_bytes, pil_image, array]):  # a list -> Predictions, in order, batched
        print(p.latex, p.score)

Every input, whatever its type, goes through `data.image.read_user_image`, the pipeline that
inference.py, evaluate.py and the web page use, and every decoding through `Reader.decode`:
those scripts are built on this class, so a reading here equals theirs on the same image.

Importing this module does not import torch: the PyTorch backend imports it when it is built,
and the ONNX Runtime backend (im2latex/onnx_backend.py) never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, overload

import numpy as np
from PIL import Image

from data.image import ImageError, ImageSource, Readings, read_user_image, read_user_readings
from data.spelling import SPELLINGS, respell
from data.vocab import Vocab
from im2latex.confidence import Calibration, calibration_path, find_calibration
from im2latex.decoding import MAX_LEN, shape_batches
from im2latex.prediction import Prediction

__all__ = ["BACKENDS", "DEFAULT_ONNX_DIR", "Backend", "ImageError", "Prediction", "Reader",
           "TorchBackend"]

# The shipped model exported for ONNX Runtime (export_model.py --onnx); the PyTorch default is
# model.checkpoint.DEFAULT_MODEL, read from there when that backend is built.
DEFAULT_ONNX_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "im2latex_onnx"
BACKENDS = ("torch", "onnx")
# What a decoder raises on an input it cannot take: torch's out-of-memory is a RuntimeError.
DECODE_ERRORS = (RuntimeError, ValueError, MemoryError)
_SOURCES = (str, Path, bytes, Image.Image, np.ndarray)
# What Reader.decode takes per image: one model input, or the readings of one image
# (data.image.read_user_readings: its glyph scale was ambiguous), the first the default.
ModelInput = np.ndarray | tuple[np.ndarray, ...]
# A later reading replaces the first only when the model reads it this much more surely, in
# mean log-probability per token. Without a margin the model's taste for its favourite scale
# picks the wrong reading: the stroke-broken reading of an anti-aliased render (the alternative
# of _separated) is almost never right, yet comes within a few hundredths of the right one.
# Set at 0.2 for v2.3-v2.4 (docs/training.md, stages 4-5 of v2); v2.9, trained on small images
# since, reads the right alternatives more surely: 0.1 keeps most of the merged-glyph readings
# of small images that 0.2 threw away, and no row of validation lost by it (stage 17).
# Readings that the pixels favour evenly (data.image.Readings.even: an image at the low edge of
# the pass-through window, also read resampled) need no margin: the surer wins (stage 17).
SECOND_READING_MARGIN = 0.1


class Backend(Protocol):
    """A loaded model that decodes model inputs (uint8 H x W, data.image.model_input): grouped
    by shape into batches of at most `batch_size`, results in input order. `calibration`: the
    curve made for these weights (im2latex/confidence.py), None without one; `calibration_note`:
    why a calibration file found beside the model was not used (None: nothing to report)."""

    vocab: Vocab
    calibration: Calibration | None
    calibration_note: str | None

    def predict(self, images: Sequence[np.ndarray], *, beam_size: int, max_len: int,
                batch_size: int) -> list[Prediction]: ...


class TorchBackend:
    """model.predict.predict on a model loaded once; torch is imported when one is built."""

    def __init__(self, model, vocab: Vocab, device: str = "cpu",
                 calibration: Calibration | None = None, calibration_note: str | None = None
                 ) -> None:
        self.model, self.vocab, self.device = model, vocab, device
        self.calibration, self.calibration_note = calibration, calibration_note

    @classmethod
    def load(cls, model_path: str | Path | None = None, device: str | None = "cpu"
             ) -> TorchBackend:
        """The checkpoint (.pt or run folder; None: the shipped model) on `device` (None: CUDA
        when there is one), with the calibration beside it when it was made for these weights.
        CheckpointError/VocabError (ValueErrors) for a bad file."""
        import torch

        from model.checkpoint import (
            DEFAULT_MODEL,
            content_digest,
            load_checkpoint,
            model_from_checkpoint,
        )

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = model_path or DEFAULT_MODEL
        ckpt = load_checkpoint(path)  # verified against its digest, which it then drops
        digest = content_digest(ckpt)  # = that digest (computed for a file from before them)
        model, vocab = model_from_checkpoint(ckpt, source=str(path), device=device)
        return cls(model, vocab, device, *find_calibration(calibration_path(path), digest))

    def predict(self, images: Sequence[np.ndarray], *, beam_size: int, max_len: int,
                batch_size: int) -> list[Prediction]:
        from model import predict  # looked up per call: tests replace it with a failing one

        return predict.predict(self.model, self.vocab, images, beam_size=beam_size,
                               max_len=max_len, batch_size=batch_size, device=self.device)


def load_backend(kind: str, model_path: str | Path | None = None, device: str | None = "cpu"
                 ) -> Backend:
    """A backend by name; model_path None means the shipped model in that backend's format."""
    if kind == "torch":
        return TorchBackend.load(model_path, device)
    if kind == "onnx":
        if device not in (None, "cpu"):
            raise ValueError(f"the ONNX backend runs on the CPU, not on {device!r}")
        try:
            from im2latex.onnx_backend import OnnxBackend
        except ImportError as e:
            raise ImportError(f"the ONNX backend needs onnxruntime (pip install -r "
                              f"requirements.txt): {e}") from e
        return OnnxBackend(model_path or DEFAULT_ONNX_DIR)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {kind!r}")


def _at_least_1(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Reader:
    """Reads formula images into LaTeX with one loaded model.

    `reader(x)` for one image gives a Prediction (`.latex`: the model's tokens separated by
    spaces, as inference.py prints them; `.score`: the mean log-probability of those tokens,
    </s> included, <= 0, higher is surer; `.confidence`: the chance, measured on validation
    images, that such a reading is exactly right, or None for a model without a calibration
    made for its weights: see `calibration_note`). `reader([x, y, ...])` gives a list, in order,
    decoded in batches of images of one size. An image is a path, the bytes of a file, a PIL
    image or a numpy array (H x W gray or H x W x 3/4 RGB(A); uint8, or float in [0, 1]).

    backend: "torch" (model_path: a .pt checkpoint or run folder) or "onnx" (model_path: a
    folder from export_model.py --onnx; no torch needed), or a Backend already loaded.
    device: where torch runs ("cpu", "cuda"; None: CUDA when available).
    normalize: bring images to the training look (inverted, cropped, rescaled); False feeds
    images already in the dataset's look as they are.
    spelling: None gives `.latex` as the model writes it; "commands" writes every font switch
    as a command (`\\mathcal { L }`, which KaTeX renders and `{ \\cal L }` is not), "references"
    as IM2LATEX-100K's references do (data/spelling.py). The image typeset is the same.
    Raises ImageError for an image that cannot be read, TypeError for an input of another type.
    """

    def __init__(self, model_path: str | Path | None = None, *, backend: str | Backend = "torch",
                 beam_size: int = 5, device: str | None = "cpu", normalize: bool = True,
                 batch_size: int = 32, max_len: int = MAX_LEN,
                 spelling: str | None = None) -> None:
        if spelling is not None and spelling not in SPELLINGS:
            raise ValueError(f"spelling must be None or one of {', '.join(SPELLINGS)}, "
                             f"got {spelling!r}")
        self.spelling = spelling
        self.beam_size = _at_least_1("beam_size", beam_size)
        self.batch_size = _at_least_1("batch_size", batch_size)
        self.max_len = _at_least_1("max_len", max_len)
        self.normalize = normalize
        self.backend = (load_backend(backend, model_path, device) if isinstance(backend, str)
                        else backend)

    @property
    def vocab(self) -> Vocab:
        return self.backend.vocab

    @property
    def calibration(self) -> Calibration | None:
        """The curve behind `Prediction.confidence`; None: confidences are None."""
        return getattr(self.backend, "calibration", None)  # a Backend of one's own may lack it

    @property
    def calibration_note(self) -> str | None:
        """Why a calibration file beside the model was refused (other weights, malformed), for
        scripts to print; None when one is used or there is none."""
        return getattr(self.backend, "calibration_note", None)

    @overload
    def __call__(self, inputs: ImageSource, *, beam_size: int | None = None) -> Prediction: ...

    @overload
    def __call__(self, inputs: list | tuple, *, beam_size: int | None = None
                 ) -> list[Prediction]: ...

    def __call__(self, inputs, *, beam_size=None):
        """One image -> its Prediction; a list or tuple of images -> their Predictions."""
        if isinstance(inputs, list | tuple):
            images = [self.readings(x, None if isinstance(x, str | Path) else f"input {i}")
                      for i, x in enumerate(inputs)]
            return self.decode(images, beam_size=beam_size)
        return self.decode([self.readings(inputs)], beam_size=beam_size)[0]

    def prepare(self, src: ImageSource, name: str | None = None) -> np.ndarray:
        """An image as the model takes it (data.image.read_user_image); ImageError names it."""
        _check_source(src)
        return read_user_image(src, name, normalize=self.normalize)

    def readings(self, src: ImageSource, name: str | None = None) -> ModelInput:
        """`prepare`'s model input, or where the glyph scale is ambiguous a tuple of it and the
        image read at the other scale (data.image.read_user_readings), for `decode` to
        judge; what `reader(x)`, inference.py and the web page decode."""
        _check_source(src)
        return read_user_readings(src, name, normalize=self.normalize)

    def decode(self, images: Sequence[ModelInput], *, beam_size: int | None = None,
               on_batch: Callable[[int], None] | None = None,
               on_error: Callable[[int, Exception], None] | None = None
               ) -> list[Prediction | None]:
        """Predictions for model inputs (`prepare`, or `readings`), in order, in batches of one
        image size. Of an image's readings every one is decoded and the first is kept unless
        a later one scores SECOND_READING_MARGIN higher (any higher, for even Readings).

        A batch that fails (out of memory, say) is retried one image at a time, so that only
        an image that cannot be decoded alone is lost: it is passed to `on_error(index, error)`
        and its place holds None; without `on_error` the error is raised. `on_batch(n)` is
        called after each batch of n inputs, for progress bars (readings count apiece)."""
        slots = [(i, k) for i, x in enumerate(images)
                 for k in range(len(x) if isinstance(x, tuple) else 1)]
        flat = [r for x in images for r in (x if isinstance(x, tuple) else (x,))]
        errors: dict[int, Exception] = {}
        preds = self._decode_flat(flat, beam_size, on_batch,
                                  lambda j, e: errors.setdefault(slots[j][0], e))
        found: list[list[tuple[int, Prediction]]] = [[] for _ in images]
        for (i, k), p in zip(slots, preds):
            if p is not None:
                found[i].append((k, p))
        out: list[Prediction | None] = []
        for i, got in enumerate(found):
            if not got and on_error is None:
                raise errors[i]
            if not got:
                on_error(i, errors[i])
            even = isinstance(images[i], Readings) and images[i].even
            out.append(_judged(got, 0.0 if even else SECOND_READING_MARGIN) if got else None)
        return out

    def _decode_flat(self, images: Sequence[np.ndarray], beam_size: int | None,
                     on_batch: Callable[[int], None] | None,
                     on_error: Callable[[int, Exception], None]) -> list[Prediction | None]:
        """One prediction per model input, None for those that fail even alone."""
        def run(idx: list[int]) -> list[Prediction]:
            preds = self.backend.predict([images[i] for i in idx], beam_size=beam,
                                         max_len=self.max_len, batch_size=self.batch_size)
            if self.spelling is not None:
                preds = [replace(p, latex=respell(p.latex, self.spelling)) for p in preds]
            if calibration is None:
                return preds
            return [replace(p, confidence=calibration.probability(p.score, beam)) for p in preds]

        beam = self.beam_size if beam_size is None else _at_least_1("beam_size", beam_size)
        calibration = self.calibration
        out: list[Prediction | None] = [None] * len(images)
        for chunk in shape_batches(images, self.batch_size):
            try:
                done = list(zip(chunk, run(chunk)))
            except DECODE_ERRORS as e:
                done = _one_at_a_time(chunk, run, e, on_error)
            for i, p in done:
                out[i] = p
            if on_batch:
                on_batch(len(chunk))
        return out


def _check_source(src: object) -> None:
    if not isinstance(src, _SOURCES):
        raise TypeError(f"cannot read a {type(src).__name__} as an image: pass a path, "
                        "bytes, a PIL image or a numpy array (several: a list of them)")


def _judged(found: list[tuple[int, Prediction]], margin: float) -> Prediction:
    """Of (reading index, prediction) pairs, the first that decoded, or the best-scoring later
    one where it clears that by margin; marked with its reading."""
    (k, pred), rest = found[0], found[1:]
    best = max(rest, key=lambda kp: kp[1].score, default=None)
    if best is not None and best[1].score >= pred.score + margin:
        k, pred = best
    return replace(pred, reading=k)


def _one_at_a_time(chunk: list[int], run: Callable[[list[int]], list[Prediction]],
                   batch_error: Exception, on_error: Callable[[int, Exception], None] | None
                   ) -> list[tuple[int, Prediction]]:
    """The images of a failed batch decoded alone (a batch of one is not decoded again); the
    ones that fail alone go to `on_error`, or raise without it."""
    done = []
    for i in chunk:
        try:
            if len(chunk) == 1:
                raise batch_error
            done.append((i, run([i])[0]))
        except DECODE_ERRORS as e:
            if on_error is None:
                raise
            on_error(i, e)
    return done
