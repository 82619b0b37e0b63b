"""Read formulas with ONNX Runtime and numpy alone: no torch in the process.

A model exported by `export_model.py --onnx DIR` (im2latex/onnx_export.py) is a folder with two
graphs, the encoder (images -> encoder output, attention keys and the decoder's initial state,
once per image) and one decoder step (tokens and state -> log-probabilities and the next state).
The search loops live here, in numpy, and follow model/search.py line by line: the same scores
(the sum of token log-probabilities, the chosen hypothesis's mean reported), the same length
counting (</s> included), the same early stop when every row has finished, and ties broken
towards the lower index as torch's CPU kernels do. So both backends pick the same tokens except
where two candidates' log-probabilities differ by less than the two runtimes' rounding
(bench/onnx_speed.py measures how often).

This module and what it imports (numpy, onnxruntime, data.vocab, im2latex.decoding and
im2latex.prediction) must never import torch: a small process without it is the point
(tests/test_onnx.py checks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from data.vocab import Vocab, VocabError
from im2latex.confidence import find_calibration
from im2latex.decoding import shape_batches
from im2latex.prediction import Prediction

ENCODER, DECODER_STEP, VOCAB, META = ("encoder.onnx", "decoder_step.onnx", "vocab.json",
                                      "onnx_model.json")
# The source checkpoint's calibration (im2latex/confidence.py), copied in by the export when it
# was made for those weights: the folder is then all a torch-free deployment needs.
CALIBRATION = "calibration.json"
FORMAT_VERSION = 1
# model/search.py's default: the best hypothesis by score / length ** LENGTH_NORM, which with
# 1.0 is the mean token log-probability, the score reported (it cannot be imported here).
LENGTH_NORM = 1.0
ENCODE_PIXELS = 2**16  # image pixels per encoder call (OnnxBackend.encode)
GATES_BYTES = 4 * 2**20  # the attention's gates per decoder-step call (OnnxBackend.step)


class OnnxModelError(ValueError):
    """An ONNX model folder that cannot be used; the message names it and the reason."""


def read_meta(onnx_dir: str | Path) -> dict:
    """The folder's onnx_model.json (model config, source checkpoint digest), checked."""
    path = Path(onnx_dir) / META
    if not Path(onnx_dir).is_dir():
        raise OnnxModelError(f"{onnx_dir}: no such folder (export one with "
                             "`python export_model.py MODEL.pt --onnx DIR`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxModelError(f"{onnx_dir}: not an ONNX model folder (no {META})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OnnxModelError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise OnnxModelError(f"{path}: unsupported format (expected format_version "
                             f"{FORMAT_VERSION}); re-export the model")
    return meta


# Decoder steps of at most this many rows (images x beams) run on one thread.
SMALL_STEP_ROWS = 4


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # as torch: intra-op threads = physical cores unless told (0 is onnxruntime's "default"),
    # one step at a time (the graphs are chains, inter-op threads would only wait)
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not path.is_file():
        raise OnnxModelError(f"{path}: missing from the ONNX model folder")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types share no useful base
        raise OnnxModelError(f"{path}: not a loadable ONNX graph ({str(e)[:200]})") from None


class OnnxBackend:
    """The two graphs and the vocabulary of an exported model, and decoding with them; the
    calibration in the folder when it was made for the weights the graphs were exported from
    (`calibration`, `calibration_note`: as im2latex.api.Backend)."""

    def __init__(self, onnx_dir: str | Path, *, threads: int | None = None):
        onnx_dir = Path(onnx_dir)
        self.meta = read_meta(onnx_dir)
        try:
            self.vocab = Vocab.load(onnx_dir / VOCAB)
        except VocabError as e:
            raise OnnxModelError(str(e)) from None
        config = self.meta.get("model_config", {})
        if config.get("vocab_size") != len(self.vocab):
            raise OnnxModelError(f"{onnx_dir}: model has {config.get('vocab_size')} output "
                                 f"tokens but the vocabulary {len(self.vocab)}")
        digest = self.meta.get("source_sha256")
        self.calibration, self.calibration_note = find_calibration(
            onnx_dir / CALIBRATION, digest if isinstance(digest, str) else "")
        self.encoder = _session(onnx_dir / ENCODER, threads)
        self.decoder_step = _session(onnx_dir / DECODER_STEP, threads)
        # A step of a few rows is too small to split across threads (the hand-off costs more
        # than it saves: docs/performance.md), so those run on a one-thread session of the
        # same graph; batches and beams keep all threads.
        self.small_step = (self.decoder_step if threads == 1
                           else _session(onnx_dir / DECODER_STEP, 1))

    def predict(self, images: Sequence[np.ndarray], *, beam_size: int, max_len: int,
                batch_size: int, on_batch: Callable[[int], None] | None = None
                ) -> list[Prediction]:
        """Predictions for uint8 H x W images, in the order given; as model.predict.predict:
        images of one size share a batch (no padding), `on_batch(n)` after each batch."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        for img in images:
            if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
                raise ValueError("images must be uint8 H x W arrays, got "
                                 f"{getattr(img, 'dtype', type(img).__name__)} "
                                 f"{getattr(img, 'shape', '')}")
        out: list[Prediction | None] = [None] * len(images)
        for chunk in shape_batches(images, batch_size):
            memory = self.encode(np.stack([images[i] for i in chunk])[:, None])
            if beam_size > 1:
                tokens, scores = self.beam_search(memory, max_len, beam_size)
            else:
                tokens, scores = self.greedy(memory, max_len)
            for j, i in enumerate(chunk):
                out[i] = Prediction(self.vocab.decode(tokens[j]), float(scores[j]))
            if on_batch:
                on_batch(len(chunk))
        return out  # type: ignore[return-value]

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 B x 1 x H x W -> {enc, keys, h, c, o}: what the decoder steps read.

        ENCODE_PIXELS at a time: the first convolutions' activations are tens of bytes per
        pixel, so a batch of 32 large images would take hundreds of MB at once (and
        onnxruntime's arena keeps its peak); images are encoded independently, so the split
        changes only the convolutions' rounding (last bits), and the time stayed within a busy
        machine's noise."""
        batch, n = images.shape[0], max(1, ENCODE_PIXELS // (images.shape[2] * images.shape[3]))
        part = self._encode(images[:n])
        if n >= batch:
            return part
        out = {name: np.empty((batch, *a.shape[1:]), a.dtype) for name, a in part.items()}
        for i in range(0, batch, n):  # filled in place: no second copy of the whole output
            part = part if i == 0 else self._encode(images[i:i + n])
            for name, a in part.items():
                out[name][i:i + n] = a
        return out

    def _encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.encoder.get_outputs()]
        try:
            return dict(zip(names, self.encoder.run(None, {"images": images})))
        except Exception as e:  # onnxruntime's Fail: too small an image, out of memory
            first = str(e).splitlines()[0][-300:] if str(e) else e.__class__.__name__
            raise RuntimeError(f"cannot encode {images.shape[2]}x{images.shape[3]} images "
                               f"(onnxruntime: {first})") from None

    def step(self, prev: np.ndarray, state: list[np.ndarray], memory: dict[str, np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step for R = B * N rows -> (log-probs R x V, new [h, c, o]).

        The attention's B x N x L x A gates are made a few images at a time, GATES_BYTES at
        most, as model/decoder.py's scratch buffer does: the passes over them then stay in
        cache (docs/performance.md, "ONNX decoder step in slices") and a large batch's peak
        memory stays small. Rows are independent: the split gives the
        same tokens (tests/test_onnx.py)."""
        keys, enc = memory["keys"], memory["enc"]
        batch, length, width = keys.shape
        per_image = prev.shape[0] // batch
        n = max(1, GATES_BYTES // (per_image * length * width * keys.itemsize))
        if n >= batch:
            return self._step(prev, state, keys, enc)
        parts = []
        for i in range(0, batch, n):
            rows = slice(i * per_image, (i + n) * per_image)
            parts.append(self._step(prev[rows], [s[rows] for s in state], keys[i:i + n],
                                    enc[i:i + n]))
        return (np.concatenate([logp for logp, _ in parts]),
                [np.concatenate([st[j] for _, st in parts]) for j in range(3)])

    def _step(self, prev: np.ndarray, state: list[np.ndarray], keys: np.ndarray,
              enc: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"token": prev, "h": state[0], "c": state[1], "o": state[2], "keys": keys,
                "enc": enc}
        session = self.small_step if len(prev) <= SMALL_STEP_ROWS else self.decoder_step
        logp, *state = session.run(["logp", "h_out", "c_out", "o_out"], feed)
        return logp, state

    def greedy(self, memory: dict[str, np.ndarray], max_len: int
               ) -> tuple[list[list[int]], np.ndarray]:
        """Argmax decoding, as model/search.py greedy_search -> (tokens per image, scores B)."""
        bos, eos = self.vocab.bos_id, self.vocab.eos_id
        batch = memory["enc"].shape[0]
        state = [memory["h"], memory["c"], memory["o"]]
        prev = np.full(batch, bos, dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        total = np.zeros(batch, dtype=np.float32)  # summed log-prob of the emitted tokens
        length = np.zeros(batch, dtype=np.int64)
        tokens = []
        for _ in range(max_len):
            logp, state = self.step(prev, state, memory)
            prev = logp.argmax(axis=-1)  # the first of equal maxima
            best = np.take_along_axis(logp, prev[:, None], axis=1)[:, 0]
            alive = ~finished
            total += np.where(alive, best, np.float32(0))
            length += alive
            tokens.append(prev)
            finished |= prev == eos
            if finished.all():
                break
        return _strip(np.stack(tokens, axis=1).tolist(), eos), total / length.astype(np.float32)

    def beam_search(self, memory: dict[str, np.ndarray], max_len: int, beam_size: int
                    ) -> tuple[list[list[int]], np.ndarray]:
        """model/search.py beam_search in numpy (its docstring explains the bookkeeping)."""
        bos, eos = self.vocab.bos_id, self.vocab.eos_id
        batch, k, vocab = memory["enc"].shape[0], beam_size, len(self.vocab)
        state = [np.repeat(memory[name], k, axis=0) for name in ("h", "c", "o")]  # row b*K+k
        prev = np.full(batch * k, bos, dtype=np.int64)
        score = np.zeros((batch, k), dtype=np.float32)
        score[:, 1:] = -np.inf  # all K start identical: only the first expands at step 0
        finished = np.zeros((batch, k), dtype=bool)
        length = np.zeros((batch, k), dtype=np.int64)
        eos_only = np.full(vocab, -np.inf, dtype=np.float32)  # continuation of a finished hyp
        eos_only[eos] = 0.0
        row_offset = np.arange(batch)[:, None] * k  # B x 1
        history: list[tuple[np.ndarray, np.ndarray]] = []  # (token, parent beam), B x K each
        for _ in range(max_len):
            logp, state = self.step(prev, state, memory)
            logp = np.where(finished[..., None], eos_only, logp.reshape(batch, k, vocab))
            candidates = (score[..., None] + logp).reshape(batch, k * vocab)
            flat = _topk(candidates, k)  # B x K
            score = np.take_along_axis(candidates, flat, axis=1)
            parent, token = flat // vocab, flat % vocab
            was_finished = np.take_along_axis(finished, parent, axis=1)
            length = np.take_along_axis(length, parent, axis=1) + ~was_finished
            finished = was_finished | (token == eos)
            rows = (parent + row_offset).reshape(-1)  # B*K rows of the surviving parents
            state = [s[rows] for s in state]
            prev = token.reshape(-1)
            history.append((token, parent))
            if finished.all():
                break
        lengths = length.astype(np.float32)
        best = (score / lengths ** LENGTH_NORM).argmax(axis=-1)[:, None]  # B x 1
        beam, picked = best, []
        for token, parent in reversed(history):  # follow the back-pointers from the last step
            picked.append(np.take_along_axis(token, beam, axis=1))
            beam = np.take_along_axis(parent, beam, axis=1)
        sequences = np.concatenate(picked[::-1], axis=1)  # B x T
        chosen = (np.take_along_axis(score, best, 1) / np.take_along_axis(lengths, best, 1))[:, 0]
        return _strip(sequences.tolist(), eos), chosen


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first, equal values by index."""
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def _strip(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos)] if eos in row else row for row in rows]

