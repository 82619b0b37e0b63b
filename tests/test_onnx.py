"""The ONNX export and the torch-free runtime: the same tokens as the PyTorch path, greedy and
beam, on a tiny random model and on the shipped one; a process where `import torch` fails reads
formulas; the shipped ONNX folder is the shipped .pt's export, with its calibration; exports
are all-or-nothing and carry the source's calibration only when it was made for its weights."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.vocab import SPECIALS, Vocab
from im2latex import Reader
from im2latex.confidence import calibration_path
from im2latex.onnx_backend import CALIBRATION, META, OnnxBackend, OnnxModelError, read_meta
from model import Im2Latex, ModelConfig
from model.checkpoint import DEFAULT_MODEL, content_digest, load_checkpoint, save_checkpoint
from model.predict import predict
from tests.conftest import HAVE_TEX, ROOT, run_script
from tests.test_confidence import write_calibration
from tests.test_shipped_model import FORMULAS

SHIPPED_ONNX = ROOT / "checkpoints" / "im2latex_onnx"
REEXPORT = "python export_model.py checkpoints/im2latex.pt --onnx checkpoints/im2latex_onnx"


def _images(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """uint8 H x W paper with dark strokes, one per shape (repeated shapes share a batch)."""
    rng = np.random.default_rng(seed)
    return [np.where(rng.random(s) < 0.15, 0, 255).astype(np.uint8) for s in shapes]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, ONNX folder) of a tiny random model with a calibration made for it,
    exported through the CLI."""
    d = tmp_path_factory.mktemp("onnx_tiny")
    torch.manual_seed(0)
    vocab = Vocab(list(SPECIALS) + [f"t{i}" for i in range(12)])
    cfg = ModelConfig(vocab_size=len(vocab), emb_dim=16, dec_rnn_h=24, enc_out_dim=32,
                      cnn_widths=(8, 16, 16, 16), add_position_features=True)
    model = Im2Latex(cfg)
    with torch.no_grad():  # sharper than the initial near-uniform attention and outputs
        model.decoder.attention.beta.mul_(100)
        model.decoder.W_out.weight.mul_(5)
    save_checkpoint({"model": model.state_dict(), "model_config": cfg.to_dict(),
                     "vocab": vocab.to_dict()}, d / "tiny.pt")
    write_calibration(d / "tiny.pt", content_digest(load_checkpoint(d / "tiny.pt")))
    out = run_script("export_model.py", d / "tiny.pt", "--onnx", d / "onnx")
    assert "exported ONNX graphs" in out.stdout and "with its calibration" in out.stdout
    return d / "tiny.pt", d / "onnx"


def _both(ckpt: Path, onnx_dir: Path, images: list[np.ndarray], **kw):
    from model.checkpoint import load_model

    model, vocab = load_model(ckpt)
    want = predict(model, vocab, images, **kw)
    got = OnnxBackend(onnx_dir, threads=1).predict(images, **kw)
    return want, got


@pytest.mark.parametrize("beam_size", [1, 4])
def test_tiny_model_same_tokens_and_scores_as_pytorch(tiny, beam_size):
    images = _images([(40, 160), (18, 6), (40, 160), (50, 120), (40, 160)])
    want, got = _both(*tiny, images, beam_size=beam_size, max_len=12, batch_size=2)
    assert [p.latex for p in got] == [p.latex for p in want]
    assert len({p.latex for p in want}) > 1  # the images are told apart: a real comparison
    np.testing.assert_allclose([p.score for p in got], [p.score for p in want], atol=1e-4)


def test_encoder_and_decoder_calls_split_by_image_give_the_same_results(tiny, monkeypatch):
    from im2latex import onnx_backend

    images = _images([(40, 160)] * 3, seed=2)
    backend = OnnxBackend(tiny[1], threads=1)
    whole = backend.predict(images, beam_size=3, max_len=12, batch_size=3)
    monkeypatch.setattr(onnx_backend, "GATES_BYTES", 1)  # one image per decoder-step call
    monkeypatch.setattr(onnx_backend, "ENCODE_PIXELS", 1)  # and per encoder call
    calls = []
    run = backend.decoder_step.run
    monkeypatch.setattr(backend.decoder_step, "run", lambda *a: calls.append(1) or run(*a))
    split = backend.predict(images, beam_size=3, max_len=12, batch_size=3)
    assert [p.latex for p in split] == [p.latex for p in whole]
    # the convolutions round differently by batch size, in the last bits only
    np.testing.assert_allclose([p.score for p in split], [p.score for p in whole], rtol=1e-5)
    assert len(calls) % 3 == 0 and len(calls) >= 6


def test_torch_free_process_reads_images(tiny, tmp_path):
    """`import torch` fails in the child; it still loads the folder and decodes."""
    ckpt, onnx_dir = tiny
    images = _images([(40, 160), (50, 120), (40, 160)], seed=1)
    np.savez(tmp_path / "imgs.npz", *images)
    child = (
        "import sys, json; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from im2latex.onnx_backend import OnnxBackend\n"
        f"imgs = list(np.load({str(tmp_path / 'imgs.npz')!r}).values())\n"
        f"be = OnnxBackend({str(onnx_dir)!r})\n"
        "print(json.dumps([[p.latex for p in be.predict(imgs, beam_size=b, max_len=12, "
        "batch_size=4)] for b in (1, 3)]))\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules "
        "if sys.modules[m] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    want = [[p.latex for p in _both(ckpt, onnx_dir, images, beam_size=b, max_len=12,
                                    batch_size=4)[0]] for b in (1, 3)]
    assert json.loads(out.stdout) == want


def test_the_export_carries_the_calibration_and_both_backends_report_the_same_confidence(tiny):
    ckpt, onnx_dir = tiny
    assert (onnx_dir / CALIBRATION).read_bytes() == calibration_path(ckpt).read_bytes()
    images = _images([(40, 160), (50, 120), (40, 160)], seed=3)
    for beam in (1, 3):
        by_torch, by_onnx = (Reader(path, backend=kind, beam_size=beam, max_len=12).decode(images)
                             for path, kind in ((ckpt, "torch"), (onnx_dir, "onnx")))
        assert [p.latex for p in by_onnx] == [p.latex for p in by_torch]
        assert all(p.confidence is not None for p in by_torch + by_onnx)
        np.testing.assert_allclose([p.confidence for p in by_onnx],
                                   [p.confidence for p in by_torch], atol=1e-6)


def test_a_calibration_for_other_weights_is_neither_exported_nor_applied(tiny, tmp_path):
    from im2latex import onnx_export

    ckpt, onnx_dir = tiny
    other = tmp_path / "copy"
    shutil.copytree(onnx_dir, other)
    doc = json.loads((other / CALIBRATION).read_text())
    (other / CALIBRATION).write_text(json.dumps({**doc, "model_sha256": "0" * 64}))
    backend = OnnxBackend(other, threads=1)
    assert backend.calibration is None and "other weights" in backend.calibration_note
    pred = Reader(backend=backend, max_len=12).decode(_images([(40, 160)]))[0]
    assert pred.confidence is None

    moved = tmp_path / "model.pt"  # the checkpoint beside another model's calibration
    shutil.copyfile(ckpt, moved)
    shutil.copyfile(other / CALIBRATION, calibration_path(moved))
    meta = onnx_export.export_onnx(moved, tmp_path / "onnx")
    assert not meta["calibrated"] and "other weights" in meta["calibration_note"]
    assert not (tmp_path / "onnx" / CALIBRATION).exists()


def test_export_is_all_or_nothing(tiny, tmp_path, monkeypatch):
    from im2latex import onnx_export

    ckpt, _ = tiny
    dst = tmp_path / "onnx"
    onnx_export.export_onnx(ckpt, dst)
    before = {f.name: f.read_bytes() for f in dst.iterdir()}

    def broken(*args, **kw):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(onnx_export, "check_export", broken)
    with pytest.raises(RuntimeError, match="killed"):
        onnx_export.export_onnx(ckpt, dst)
    assert {f.name: f.read_bytes() for f in dst.iterdir()} == before  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary folder left
    other = tmp_path / "notes"
    other.mkdir()
    with pytest.raises(OnnxModelError, match="not an ONNX model folder"):
        onnx_export.export_onnx(ckpt, other)


def test_bad_folders_and_inputs_give_clear_errors(tiny, tmp_path):
    with pytest.raises(OnnxModelError, match="no such folder"):
        OnnxBackend(tmp_path / "missing")
    with pytest.raises(OnnxModelError, match="not an ONNX model folder"):
        OnnxBackend(tmp_path)
    backend = OnnxBackend(tiny[1], threads=1)
    with pytest.raises(ValueError, match="uint8 H x W"):
        backend.predict([np.zeros((40, 160), np.float32)], beam_size=1, max_len=5, batch_size=1)
    with pytest.raises(RuntimeError, match="cannot encode 4x4 images"):
        backend.predict(_images([(4, 4)]), beam_size=1, max_len=5, batch_size=1)


def test_shipped_onnx_is_the_export_of_the_shipped_checkpoint():
    meta = read_meta(SHIPPED_ONNX)
    ckpt = load_checkpoint(DEFAULT_MODEL)
    assert meta["source_sha256"] == content_digest(ckpt), (
        f"checkpoints/im2latex_onnx/ was exported from another model than checkpoints/"
        f"im2latex.pt; re-export it: {REEXPORT}")
    assert meta["model_config"] == ckpt["model_config"]
    assert (SHIPPED_ONNX / META).is_file()
    assert (SHIPPED_ONNX / CALIBRATION).read_bytes() == calibration_path(
        DEFAULT_MODEL).read_bytes(), f"the shipped calibration changed: re-export, {REEXPORT}"


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_shipped_onnx_same_tokens_as_pytorch_on_rendered_formulas():
    from data.image import read_user_image
    from data.normalize import detokenize
    from data.render import render_formulas

    rendered = render_formulas([detokenize(f) for f in FORMULAS])
    assert all(img is not None for img in rendered)
    images = [read_user_image(img) for img in rendered]  # as inference.py reads a PNG
    for beam_size in (1, 5):
        want, got = _both(DEFAULT_MODEL, SHIPPED_ONNX, images, beam_size=beam_size,
                          max_len=150, batch_size=4)
        assert [p.latex for p in got] == [p.latex for p in want]
        assert sum(p.latex == f for p, f in zip(got, FORMULAS)) >= 6  # it reads them, too


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_speed_bench_runs_both_backends(tmp_path):
    out = run_script("bench/onnx_speed.py", "--n", "3", "--latency", "2", "--warmup", "1",
                     "--batch", "2", "--beam_size", "2", "--threads", "1",
                     "--formulas", tmp_path / "absent.txt")  # generated formulas instead
    lines = out.stdout.strip().splitlines()
    assert "of generated formulas" in lines[0]
    assert [ln.split()[0] for ln in lines[1:3]] == ["torch", "onnx"]
    m = re.match(r"onnx_speed: greedy latency torch [\d.]+ ms, onnx [\d.]+ ms \([\d.]+x\); "
                 r"throughput greedy [\d.]+x, beam2 [\d.]+x; peak RSS single-image torch \d+ MB, "
                 r"onnx \d+ MB \([\d.]+\), with batches [\d.]+; identical tokens greedy "
                 r"([\d.]+)%, beam ([\d.]+)%$", lines[-1])
    assert m, lines[-1]
    assert 0 <= float(m[1]) <= 100 and 0 <= float(m[2]) <= 100
