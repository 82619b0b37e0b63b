"""im2latex.Reader, the Python API: every input type reads like inference.py, a list is batched
and kept in order, bad input fails clearly, a failed batch loses only the image that cannot be
decoded, the README's example runs as written, the package imports without torch, and the
shipped model's calibrated confidence is the same through both backends."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.image import ImageError, Readings
from im2latex import Prediction, Reader
from im2latex.api import SECOND_READING_MARGIN
from tests.conftest import HAVE_TEX, ROOT, run_script

pytestmark = pytest.mark.skipif(not HAVE_TEX, reason="renders its formulas: needs pdflatex, gs")

FORMULAS = ["x ^ { 2 } + y ^ { 2 } = z ^ { 2 }",
            "\\sum _ { i = 1 } ^ { n } i = \\frac { n ( n + 1 ) } { 2 }"]
BEAM = 2  # cheaper than the default 5, and still beam search


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    """The formulas rendered now, as gray PNG files of two different model input sizes."""
    from data.normalize import detokenize
    from data.render import render_formulas

    d = tmp_path_factory.mktemp("api")
    paths = []
    for i, img in enumerate(render_formulas([detokenize(f) for f in FORMULAS])):
        assert img is not None
        paths.append(d / f"f{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def reader() -> Reader:
    return Reader(beam_size=BEAM)  # the shipped model


@pytest.fixture(scope="module")
def by_inference(pngs) -> dict[str, dict]:
    """inference.py's results on the files, by file name."""
    out = pngs[0].parent / "out.json"
    run_script("inference.py", *pngs, "--beam_size", str(BEAM), "--json", out, "--device", "cpu")
    return {Path(r["name"]).name: r for r in json.loads(out.read_text())["results"]}


def same(pred: Prediction, result: dict) -> bool:
    return pred.latex == result["predict"] and abs(pred.score - result["score"]) <= 1e-4


def test_the_shipped_model_gives_the_same_calibrated_confidence_through_both_backends(
        reader, pngs, by_inference):
    onnx = Reader(backend="onnx", beam_size=BEAM)
    assert reader.calibration is not None and onnx.calibration is not None
    for path in pngs:
        by_torch, by_onnx = reader(path), onnx(path)
        assert by_torch.latex == by_onnx.latex
        assert 0 <= by_torch.confidence <= 1
        assert by_torch.confidence == pytest.approx(
            reader.calibration.probability(by_torch.score, BEAM), abs=1e-12)
        # the runtimes' fp32 scores differ by ~1e-7 and the curve rises < 10 per unit of score
        # (measured: at most 1.8e-6 apart on 8 rendered formulas, greedy and beam 5)
        assert by_onnx.confidence == pytest.approx(by_torch.confidence, abs=1e-5)
        assert by_inference[path.name]["confidence"] == pytest.approx(by_torch.confidence,
                                                                      abs=1e-4)


def every_input_type(path: Path) -> dict[str, object]:
    gray = np.asarray(Image.open(path).convert("L"))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    return {"str": str(path), "Path": path, "bytes": path.read_bytes(), "PIL": Image.open(path),
            "gray uint8": gray, "RGB uint8": rgb,
            "RGBA uint8": np.dstack([rgb, np.full_like(gray, 255)]),
            "float [0,1]": gray / 255.0, "H x W x 1": gray[..., None]}


def test_every_input_type_reads_like_inference_py(reader, pngs, by_inference):
    inputs = every_input_type(pngs[0])
    preds = reader(list(inputs.values()))  # one size: one batch
    expected = by_inference[pngs[0].name]
    assert expected["predict"] == FORMULAS[0]  # the shipped model reads this render
    assert {kind: same(p, expected) for kind, p in zip(inputs, preds)} == dict.fromkeys(
        inputs, True)
    assert same(reader(inputs["PIL"]), expected)  # one image alone: a Prediction, not a list


def test_a_list_is_batched_by_size_and_kept_in_order(reader, pngs, by_inference, monkeypatch):
    calls = []
    real = reader.backend.predict

    def counting(images, **kw):
        calls.append(len(images))
        return real(images, **kw)

    monkeypatch.setattr(reader.backend, "predict", counting)
    a, b = pngs
    assert reader.prepare(a).shape != reader.prepare(b).shape
    preds = reader([a, b.read_bytes(), Image.open(a), a])
    assert sorted(calls) == [1, 3]  # the three of a's size decoded together
    assert [p.latex for p in preds] == [by_inference[n]["predict"] for n in
                                        (a.name, b.name, a.name, a.name)]
    assert reader(()) == [] and reader([]) == []


def test_bad_input_raises_a_clear_error(reader, pngs, tmp_path):
    with pytest.raises(TypeError, match="path, bytes, a PIL image or a numpy array"):
        reader(42)
    cases = [(b"not an image", "<bytes>: not a readable image"),
             ([pngs[0], b"junk"], "input 1: not a readable image"),
             (tmp_path / "missing.png", "missing.png: no such file"),
             (np.full((3, 40, 40), 255, np.uint8), "pass a list"),
             (np.full((40, 40), 2.0), r"float array must hold values in \[0, 1\]"),
             (np.full((40, 40), 255, np.int64), "expected uint8"),
             (np.full((40, 40), 255, np.uint8), "no ink")]
    for bad, message in cases:
        with pytest.raises(ImageError, match=message):
            reader(bad)
    for kw in ({"beam_size": 0}, {"batch_size": -1}, {"backend": "tensorflow"},
               {"backend": "onnx", "device": "cuda"}):
        with pytest.raises(ValueError):
            Reader(**kw)


class FakeBackend:
    """Reads each image as its width; fails batches of more than one image, and any batch
    holding an image `fail_width` wide."""

    vocab = None

    def __init__(self, fail_width: int = -1) -> None:
        self.fail_width, self.calls = fail_width, []

    def predict(self, images, *, beam_size, max_len, batch_size):
        self.calls.append(len(images))
        if len(images) > 1 or images[0].shape[1] == self.fail_width:
            raise RuntimeError("out of memory\nmore detail")
        return [Prediction(str(img.shape[1]), -1.0) for img in images]


def test_a_failed_batch_is_retried_alone_and_loses_only_what_fails_alone():
    images = [np.zeros((40, w), np.uint8) for w in (120, 160, 120, 120)]
    backend = FakeBackend(fail_width=160)
    reader = Reader(backend=backend, batch_size=2)
    lost, seen = [], []
    preds = reader.decode(images, on_error=lambda i, e: lost.append((i, str(e))),
                          on_batch=seen.append)
    assert [p and p.latex for p in preds] == ["120", None, "120", "120"]
    assert lost == [(1, "out of memory\nmore detail")]
    assert backend.calls == [2, 1, 1, 1, 1] and seen == [2, 1, 1]  # failed pair retried alone
    with pytest.raises(RuntimeError, match="out of memory"):
        reader.decode(images)  # without on_error, an image that fails alone raises


class ScoredBackend:
    """Reads each image as its width, as surely as its top-left pixel says (score -pixel/100);
    fails any image `fail_width` wide."""

    vocab = None

    def __init__(self, fail_width: int = -1) -> None:
        self.fail_width = fail_width

    def predict(self, images, *, beam_size, max_len, batch_size):
        if any(img.shape[1] == self.fail_width for img in images):
            raise RuntimeError("out of memory")
        return [Prediction(str(img.shape[1]), -float(img[0, 0]) / 100) for img in images]


def scored(width: int, score: float) -> np.ndarray:
    img = np.full((40, width), 255, np.uint8)
    img[0, 0] = round(-score * 100)
    return img


def test_a_second_reading_is_kept_only_when_the_model_reads_it_much_more_surely():
    reader = Reader(backend=ScoredBackend(), batch_size=4)
    clear = (scored(120, -0.6), scored(160, -0.6 + SECOND_READING_MARGIN + 0.05))
    close = (scored(120, -0.6), scored(160, -0.6 + SECOND_READING_MARGIN - 0.05))
    preds = reader.decode([clear, close, scored(200, -0.1), (scored(240, -0.3),)])
    assert [(p.latex, p.reading) for p in preds] == [("160", 1), ("120", 0), ("200", 0),
                                                      ("240", 0)]
    # the kept reading's own score
    assert preds[0].score == pytest.approx(-0.6 + SECOND_READING_MARGIN + 0.05)


def test_even_readings_keep_whichever_the_model_reads_more_surely():
    """Readings that the pixels favour evenly (an image at the low edge of the pass-through
    window and the same image resampled) need no margin: the surer wins, even by a little."""
    reader = Reader(backend=ScoredBackend(), batch_size=4)
    slightly = (scored(120, -0.6), scored(160, -0.55))
    preds = reader.decode([Readings(slightly, even=True), Readings(slightly),
                           Readings((scored(120, -0.5), scored(160, -0.55)), even=True)])
    assert [(p.latex, p.reading) for p in preds] == [("160", 1), ("120", 0), ("120", 0)]


def test_a_reading_that_fails_leaves_the_other_and_only_an_image_without_any_is_lost():
    reader = Reader(backend=ScoredBackend(fail_width=120), batch_size=1)
    lost = []
    preds = reader.decode([(scored(120, -0.1), scored(160, -0.9)), (scored(120, -0.1),)],
                          on_error=lambda i, e: lost.append(i))
    assert (preds[0].latex, preds[0].reading) == ("160", 1) and preds[1] is None
    assert lost == [1]


def test_the_readme_example_runs(reader, pngs, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6
    for name, src in (("formula.png", pngs[0]), ("a.png", pngs[1]), ("b.png", pngs[0])):
        (tmp_path / name).write_bytes(src.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    default = Reader(backend=reader.backend)  # the example's settings, the model loaded here
    first, second = default([pngs[0], pngs[1]])
    assert lines[0] == first.latex
    assert [line.rsplit(" ", 1)[0] for line in lines[1:]] == [second.latex, first.latex]
    assert all(float(line.rsplit(" ", 1)[1]) <= 0 for line in lines[1:])


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from PIL import Image
from im2latex import Reader
reader = Reader(backend="onnx", beam_size=1)
print(reader(np.asarray(Image.open(sys.argv[1]))).latex)
assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v)
"""


def test_the_package_and_the_onnx_reader_run_without_torch(reader, pngs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", TORCH_FREE, str(pngs[1])], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == reader(pngs[1], beam_size=1).latex


def test_image_bytes_and_a_lazy_pil_image_are_not_changed(pngs):
    from data.image import read_user_image

    data = pngs[0].read_bytes()
    im = Image.open(io.BytesIO(data))
    gray = np.asarray(Image.open(pngs[0]).convert("L"))
    before = gray.copy()
    assert np.array_equal(read_user_image(im), read_user_image(data))
    assert np.array_equal(read_user_image(gray), read_user_image(data))
    assert np.array_equal(gray, before)


class SpellingBackend:
    """Reads every image as a calligraphic L and a bold x, in the corpora's spelling."""

    vocab = None

    def predict(self, images, *, beam_size, max_len, batch_size):
        return [Prediction(r"\mathcal { L } = { \rm d } \mathbf { x }", -0.5) for _ in images]


def test_the_reader_writes_font_switches_in_the_spelling_asked_for():
    image = np.zeros((40, 120), np.uint8)
    as_read = Reader(backend=SpellingBackend(), normalize=False)(image)
    assert as_read.latex == r"\mathcal { L } = { \rm d } \mathbf { x }"
    references = Reader(backend=SpellingBackend(), normalize=False, spelling="references")
    assert references(image).latex == r"{ \cal L } = \mathrm { d } { \bf x }"
    commands = Reader(backend=SpellingBackend(), normalize=False, spelling="commands")
    assert commands([image])[0].latex == r"\mathcal { L } = \mathrm { d } \mathbf { x }"
    assert commands(image).score == as_read.score == -0.5
    with pytest.raises(ValueError, match="spelling"):
        Reader(backend=SpellingBackend(), spelling="modern")
