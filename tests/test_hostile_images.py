"""Hostile images (issue 16): bounded time and memory per image, and no lost batch.

Each image here once held a server or a batch job for minutes, or lost a batch: a 739-byte dot
pattern upscaled 18x, noise whose component analysis and upscaling took gigabytes, a long strip
normalized below the encoder's minimum height."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.image import (
    BUCKETS,
    MIN_HEIGHT,
    MIN_WIDTH,
    ImageError,
    load_image,
    normalize_user_image,
    pad_to_bucket,
)
from data.vocab import SPECIALS, Vocab
from model import Im2Latex, ModelConfig
from model.checkpoint import save_checkpoint
from model.encoder import Encoder
from tests.conftest import ROOT, run_script

LARGEST_W, LARGEST_H = BUCKETS[-1]


def dot_pattern(n: int = 400, step: int = 4) -> np.ndarray:
    img = np.full((n, n), 255, np.uint8)
    img[::step, ::step] = 0
    return img


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 2, (n, n), dtype=np.uint8) * 255)


def strip() -> np.ndarray:
    """20000 x 200: a long bar cut into dashes, as wide as a formula could never be read."""
    img = np.full((200, 20000), 255, np.uint8)
    img[80:120, 100:19900] = 0
    img[80:120, ::50] = 255
    return img


def formula_like() -> np.ndarray:
    """Text drawn with PIL's built-in font: glyphs of a screenshot, no TeX needed."""
    im = Image.new("L", (260, 40), 255)
    ImageDraw.Draw(im).text((10, 10), "x^2 + y_1 = (a+b)/c", fill=0)
    return np.asarray(im)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_a_tiny_dot_pattern_png_is_refused_not_upscaled():
    data = png(dot_pattern())
    assert len(data) < 2000  # the attack is a small upload
    with pytest.raises(ImageError, match="too many ink components"):
        normalize_user_image(load_image(data, name="dots.png"))


@pytest.mark.parametrize("img", [dot_pattern(400, 8), noise(300), dot_pattern(60, 3)],
                         ids=["sparse-dots", "small-noise", "tiny-dots"])
def test_tiny_glyphs_are_not_magnified_beyond_the_largest_bucket(img):
    out = normalize_user_image(img)
    assert out.dtype == np.uint8
    assert out.shape[0] <= LARGEST_H and out.shape[1] <= LARGEST_W
    # at most 3x (REFERENCE_GLYPH_SIZE / MIN_GLYPH_SIZE) in output pixels, plus the padding
    assert max(out.shape) <= 3 * max(img.shape) + 8


def test_a_long_strip_fits_a_bucket_and_the_encoder():
    out = normalize_user_image(strip())
    assert out.shape[0] >= MIN_HEIGHT and out.shape[1] <= LARGEST_W
    x = torch.from_numpy(pad_to_bucket(out)).float()[None, None] / 255
    encoder = Encoder(widths=(2, 2, 2, 2), out_dim=2, batch_norm=True)
    encoder.eval()(x)  # raised for the 17-px-high input


def test_min_size_is_the_encoders():
    enc = Encoder(widths=(2, 2, 2, 2), out_dim=2, batch_norm=True).eval()
    enc(torch.zeros(1, 1, MIN_HEIGHT, MIN_WIDTH))
    for h, w in ((MIN_HEIGHT - 1, MIN_WIDTH), (MIN_HEIGHT, MIN_WIDTH - 1)):
        with pytest.raises(RuntimeError):
            enc(torch.zeros(1, 1, h, w))


def test_thin_images_are_padded_up_to_the_minimum():
    img = np.full((30, 400), 255, np.uint8)
    img[14:16, 20:380] = 0  # a fraction bar alone: at the training scale, 2 px high
    out = normalize_user_image(img)
    assert out.shape[0] >= MIN_HEIGHT and out.shape[1] >= MIN_WIDTH


_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from data.image import ImageError, normalize_user_image
    from tests.test_hostile_images import dot_pattern, noise
    img = {make}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    try:
        shape = list(normalize_user_image(img).shape)
    except ImageError as e:
        shape = str(e)
    print(json.dumps({{"seconds": time.perf_counter() - t, "shape": shape,
                      "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                   - before) / 1024}}))
""")


@pytest.mark.parametrize("make", ["dot_pattern(400, 4)", "noise(2400)", "noise(4000)",
                                  "noise(2400, 1) | 254"])
def test_hostile_images_cost_bounded_time_and_memory(make):
    """In a fresh process, so that ru_maxrss is this image's. Bounds are generous for CI; the
    old code took minutes and gigabytes on each (the last one: faint noise, no ink at all)."""
    code = _MEASURE.format(root=str(ROOT), make=make)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert isinstance(r["shape"], str) or (r["shape"][0] <= LARGEST_H
                                           and r["shape"][1] <= LARGEST_W), r
    assert r["seconds"] < 5 and r["extra_mb"] < 400, r


def tiny_checkpoint(path) -> None:
    """An untrained model is enough: the test is about which images reach the decoder."""
    vocab = Vocab([*SPECIALS, "x", "y", "+"])
    cfg = ModelConfig(vocab_size=len(vocab), emb_dim=8, dec_rnn_h=8, enc_out_dim=8,
                      cnn_widths=(4, 4, 4, 4))
    torch.manual_seed(0)
    save_checkpoint({"model": Im2Latex(cfg).state_dict(), "model_config": cfg.to_dict(),
                     "vocab": vocab.to_dict()}, path)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A folder with one good image and three hostile ones, and a tiny checkpoint."""
    d = tmp_path_factory.mktemp("hostile")
    for name, img in (("good.png", formula_like()), ("strip.png", strip()),
                      ("dots.png", dot_pattern()), ("noise.png", noise(1000))):
        (d / name).write_bytes(png(img))
    tiny_checkpoint(d / "tiny.pt")
    return d


def test_inference_decodes_the_good_images_and_lists_the_hostile_ones(batch, tmp_path):
    out = tmp_path / "out.json"
    p = run_script("inference.py", "--model_path", batch / "tiny.pt", "--beam_size", "1",
                   "--max_len", "5", "--json", out, *(batch / n for n in
                   ("good.png", "strip.png", "dots.png", "noise.png")), check=False, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [r["name"].rsplit("/", 1)[-1] for r in doc["results"]] == ["good.png", "strip.png"]
    errors = {e["name"].rsplit("/", 1)[-1]: e["error"] for e in doc["errors"]}
    assert sorted(errors) == ["dots.png", "noise.png"]
    assert all("too many ink components" in m for m in errors.values())
    assert "dots.png" in p.stderr and "noise.png" in p.stderr


def test_an_image_that_cannot_be_decoded_loses_only_itself(batch, tmp_path, monkeypatch):
    import inference
    from model import predict

    real = predict.predict  # what the Reader's PyTorch backend decodes with

    def fragile(model, vocab, images, **kw):  # the decoder fails on the strip's bucket only
        if any(img.shape[1] == LARGEST_W for img in images):
            raise RuntimeError("out of memory\nmore detail")
        return real(model, vocab, images, **kw)

    monkeypatch.setattr(predict, "predict", fragile)
    out = tmp_path / "out.json"
    rc = inference.main([str(batch / "good.png"), str(batch / "strip.png"), "--model_path",
                         str(batch / "tiny.pt"), "--beam_size", "1", "--max_len", "5",
                         "--json", str(out), "--device", "cpu"])
    assert rc == 2
    doc = json.loads(out.read_text())
    assert [r["name"].rsplit("/", 1)[-1] for r in doc["results"]] == ["good.png"]
    assert "cannot decode (out of memory)" in doc["errors"][0]["error"]


def test_no_normalize_refuses_images_beyond_the_largest_bucket(batch, tmp_path):
    out = tmp_path / "out.json"
    p = run_script("inference.py", "--model_path", batch / "tiny.pt", "--beam_size", "1",
                   "--max_len", "5", "--no_normalize", "--json", out, batch / "good.png",
                   batch / "noise.png", check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 1
    assert "larger than the largest bucket" in doc["errors"][0]["error"]


def test_a_dataset_build_skips_hostile_files_and_keeps_the_rest(batch, tmp_path):
    folder = tmp_path / "answers"
    folder.mkdir()
    for name in ("good.png", "dots.png", "noise.png"):
        (folder / name).write_bytes((batch / name).read_bytes())
    p = run_script("jerry_preprocess.py", "--single_label", folder, "--label", "x + y",
                   "--data_path", tmp_path / "data", "--quiet", check=False, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "written: 1, skipped: 2" in p.stdout
    assert "dots.png: too many ink components" in p.stderr
    assert "noise.png: too many ink components" in p.stderr


def test_fuzz_pass_over_every_kind_of_hostile_image():
    from bench.fuzz_images import KINDS, fuzz

    summary, failures = fuzz(2 * len(KINDS), seed=1, max_seconds=10, max_rss_mb=1500)
    assert failures == [], failures
    assert f"{2 * len(KINDS)} images" in summary and "0 failures" in summary
