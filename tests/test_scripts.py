"""evaluate.py, inference.py, preprocess.py and build_vocab.py run from the shell, with good
and bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.image import BUCKETS
from data.layout import IMAGES_DIR, read_lines
from tests.conftest import ROOT, SHARED, run_script


def test_preprocess_writes_standard_layout_and_shards(tiny_dataset):
    for name in ("im2latex_formulas.norm.lst", "im2latex_train_filter.lst",
                 "im2latex_validate_filter.lst", "im2latex_test_filter.lst", "vocab.json"):
        assert (tiny_dataset / name).is_file(), name
    formulas = read_lines(tiny_dataset / "im2latex_formulas.norm.lst")
    train = read_lines(tiny_dataset / "im2latex_train_filter.lst")
    assert len(train) > 60 and len(set(formulas)) == len(formulas)
    name, idx = train[0].split()
    assert (tiny_dataset / IMAGES_DIR / name).is_file() and int(idx) < len(formulas)
    index = json.loads((tiny_dataset / "shards" / "train" / "index.json").read_text())
    assert sum(len(b["names"]) for b in index["buckets"]) == len(train)


def test_preprocess_rerun_is_resumable_and_identical(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / IMAGES_DIR).iterdir()}
    run_script("preprocess.py", "--generate", "120", "--data_path", copy, "--quiet",
               "--split_ratio", "0.7", "0.15", "0.15", "--seed", "3")
    after = {p.name: p.stat().st_mtime_ns for p in (copy / IMAGES_DIR).iterdir()}
    assert before == after  # nothing re-rendered
    for f in ("im2latex_formulas.norm.lst", "im2latex_train_filter.lst"):
        assert (copy / f).read_text() == (tiny_dataset / f).read_text()


def test_preprocess_reports_broken_lines_and_keeps_the_rest(tiny_dataset, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_dataset, d, ignore=shutil.ignore_patterns("shards"))
    lst = d / "im2latex_train_filter.lst"
    lines = read_lines(lst)
    first = lines[0].split()[0]
    (d / IMAGES_DIR / first).write_bytes(b"\x89PNG garbage")
    lines += ["missing.png 0", f"{lines[1].split()[0]} 999999", "just-one-field"]
    lst.write_text("\n".join(lines) + "\n")
    p = run_script("preprocess.py", "--data_path", d, "--quiet")
    assert f"{lst}:1" in p.stderr and f"{lst}:{len(lines) - 2}" in p.stderr
    assert "out of range" in p.stderr and "not found" in p.stderr
    assert f"train: {len(lines) - 4} images" in p.stdout and "4 skipped" in p.stdout


def test_preprocess_reads_the_original_sample_layout(tmp_path):
    sample = SHARED / "im2latex100k_sample"
    if not sample.is_dir():
        pytest.skip("../shared/data not available")
    d = tmp_path / "sample"
    d.mkdir()
    for f in sample.iterdir():
        (d / f.name).symlink_to(f)
    p = run_script("preprocess.py", "--data_path", d, "--quiet")
    assert "train: 897 images" in p.stdout and "validate: 85 images" in p.stdout
    index = json.loads((d / "shards" / "validate" / "index.json").read_text())
    assert sum(len(b["names"]) for b in index["buckets"]) == 85
    assert {(b["width"], b["height"]) for b in index["buckets"]} <= set(BUCKETS)


def test_preprocess_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    p = run_script("preprocess.py", "--render", empty, "--data_path", tmp_path / "o",
                   check=False)
    assert p.returncode != 0 and "no formulas" in p.stderr
    p = run_script("preprocess.py", "--data_path", tmp_path / "nothing", check=False)
    assert p.returncode != 0 and "not found" in p.stderr and "Traceback" not in p.stderr
    garbage = tmp_path / "garbage.txt"
    huge = b"x + " * 5000  # 10,000 tokens
    garbage.write_bytes(bytes(range(256)) * 8 + b"\n\\frac { 1 } { 2 }\n{ unbalanced\n"
                        + huge + b"\n")
    p = run_script("preprocess.py", "--render", garbage, "--data_path", tmp_path / "g",
                   "--quiet", "--split_ratio", "1", "0", "0", "--test_file", garbage,
                   check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    formulas = read_lines(tmp_path / "g" / "im2latex_formulas.norm.lst")
    test = [formulas[int(ln.split()[1])]
            for ln in read_lines(tmp_path / "g" / "im2latex_test_filter.lst")]
    assert "\\frac { 1 } { 2 }" in test  # the good line survives the garbage around it
    assert not any(len(f.split()) > 1000 for f in test)  # the 10,000-token line fails alone
    assert not any("unbalanced" in f for f in formulas)
    assert "failed to render" in p.stdout and "unbalanced braces" in p.stdout


def test_evaluate_writes_aligned_files_and_prints_scores(tiny_dataset, tiny_model, tmp_path):
    ref, res = tmp_path / "ref.txt", tmp_path / "res.txt"
    p = run_script("evaluate.py", "--split", "test", "--model_path", tiny_model,
                   "--data_path", tiny_dataset, "--batch_size", "4", "--beam_size", "3",
                   "--ref_path", ref, "--result_path", res, "--quiet", "--render",
                   "--metrics_path", tmp_path / "m.json")
    n = len(read_lines(tiny_dataset / "im2latex_test_filter.lst"))
    refs, results = read_lines(ref), read_lines(res)
    assert len(refs) == len(results) == n
    formulas = read_lines(tiny_dataset / "im2latex_formulas.norm.lst")
    order = [int(line.split()[1]) for line in read_lines(tiny_dataset /
                                                         "im2latex_test_filter.lst")]
    assert refs == [formulas[i] for i in order]  # same order as the split file, untruncated
    for label in ("BLEU-4:", "Edit distance:", "Exact match:", "Image exact match:"):
        assert any(line.startswith(label) for line in p.stdout.splitlines()), label
    m = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= m["bleu4"] <= 100 and m["images"] == n


def test_evaluate_plain_folder_with_matching_file(tiny_dataset, tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    formulas = read_lines(tiny_dataset / "im2latex_formulas.norm.lst")
    lines = read_lines(tiny_dataset / "im2latex_test_filter.lst")[:3]
    (tmp_path / "f.txt").write_text("".join(formulas[int(ln.split()[1])] + "\n" for ln in lines))
    match = []
    for k, ln in enumerate(lines):
        shutil.copy(tiny_dataset / IMAGES_DIR / ln.split()[0], folder / f"{k}.png")
        match.append(f"{k}.png {k}")
    (tmp_path / "m.txt").write_text("\n".join(match) + "\n")
    p = run_script("evaluate.py", "--images", folder, "--matching", tmp_path / "m.txt",
                   "--formulas", tmp_path / "f.txt", "--model_path", tiny_model, "--quiet",
                   "--ref_path", tmp_path / "r", "--result_path", tmp_path / "h")
    assert "images: 3" in p.stdout and len(read_lines(tmp_path / "h")) == 3


def test_evaluate_bad_input(tiny_dataset, tiny_model, tmp_path):
    p = run_script("evaluate.py", "--data_path", tmp_path, "--model_path", tiny_model,
                   check=False)
    assert p.returncode != 0 and "not found" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "x.pt").write_text("nope")
    p = run_script("evaluate.py", "--data_path", tiny_dataset, "--model_path", tmp_path / "x.pt",
                   "--quiet", check=False)
    assert p.returncode == 1 and "x.pt" in p.stderr and "Traceback" not in p.stderr


def _variants(src, folder):
    """The same formula as a user might hand it over: RGB, RGBA, inverted, 16-bit, scaled."""
    img = np.asarray(Image.open(src).convert("L"))
    Image.fromarray(img).convert("RGB").save(folder / "rgb.png")
    rgba = np.zeros(img.shape + (4,), np.uint8)
    rgba[..., 3] = 255 - img  # ink opaque, background transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(255 - img).save(folder / "inverted.jpg", quality=95)
    Image.fromarray(img.astype(np.uint16) * 257).save(folder / "sixteen.png")
    big = Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.BICUBIC)
    canvas = Image.new("L", (big.width + 300, big.height + 200), 255)
    canvas.paste(big, (150, 100))
    canvas.save(folder / "screenshot.png")


def test_inference_reads_any_image_and_survives_bad_files(tiny_dataset, tiny_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    first = read_lines(tiny_dataset / "im2latex_test_filter.lst")[0].split()[0]
    _variants(tiny_dataset / IMAGES_DIR / first, folder)
    (folder / "notes.png").write_text("this is not an image")
    (folder / "truncated.png").write_bytes((tiny_dataset / IMAGES_DIR / first).read_bytes()[:60])
    out = tmp_path / "out.json"
    p = run_script("inference.py", "--model_path", tiny_model, folder, "--json", out,
                   "--beam_size", "2", check=False)
    assert p.returncode == 2
    assert "notes.png" in p.stderr and "truncated.png" in p.stderr and "Traceback" not in p.stderr
    doc = json.loads(out.read_text())
    names = sorted(r["name"].rsplit("/", 1)[-1] for r in doc["results"])
    assert names == ["inverted.jpg", "rgb.png", "rgba.png", "screenshot.png", "sixteen.png"]
    for r in doc["results"]:
        assert isinstance(r["predict"], str) and r["score"] <= 0
        assert r["confidence"] is None  # the tiny model has no calibration: null, no note
    assert "note: " not in p.stderr


def test_inference_single_image_prints_latex(tiny_dataset, tiny_model):
    first = read_lines(tiny_dataset / "im2latex_test_filter.lst")[0].split()[0]
    p = run_script("inference.py", "--model_path", tiny_model, tiny_dataset / IMAGES_DIR / first,
                   "--beam_size", "1")
    assert len(p.stdout.strip().splitlines()) == 1 and "\t" not in p.stdout


def test_inference_confidence_from_a_calibration_for_these_weights_only(
        tiny_dataset, tiny_model, tmp_path):
    from im2latex.confidence import calibration_path
    from model.checkpoint import content_digest, load_checkpoint
    from tests.test_confidence import write_calibration

    first = read_lines(tiny_dataset / "im2latex_test_filter.lst")[0].split()[0]
    image = tiny_dataset / IMAGES_DIR / first
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(tiny_model.read_bytes())
    plain = run_script("inference.py", "--model_path", ckpt, image, "--beam_size", "1")

    def result(beam: str) -> tuple[dict, str]:
        out = tmp_path / "out.json"
        p = run_script("inference.py", "--model_path", ckpt, image, "--beam_size", beam,
                       "--json", out)
        return json.loads(out.read_text())["results"][0], p.stderr

    sha = content_digest(load_checkpoint(ckpt))
    cal = write_calibration(ckpt, sha)
    for beam in ("1", "2"):
        r, err = result(beam)
        assert r["confidence"] == pytest.approx(cal.probability(r["score"], int(beam)),
                                                abs=1e-3) and "note: " not in err
    again = run_script("inference.py", "--model_path", ckpt, image, "--beam_size", "1")
    assert again.stdout == plain.stdout  # the plain output stays the LaTeX alone
    write_calibration(ckpt, "0" * 64)
    r, err = result("1")
    assert r["confidence"] is None
    assert err.strip() == (f"note: {calibration_path(ckpt)}: measured on other weights (sha256 "
                           f"000000000000..., this model {sha[:12]}"
                           "...); rerun bench/confidence.py for this model; no calibrated "
                           "confidence")


def test_inference_attention_figure(tiny_dataset, tiny_model, tmp_path):
    first = read_lines(tiny_dataset / "im2latex_test_filter.lst")[0].split()[0]
    fig = tmp_path / "att.png"
    run_script("inference.py", "--model_path", tiny_model, tiny_dataset / IMAGES_DIR / first,
               "--beam_size", "1", "--attention_figure", fig)
    with Image.open(fig) as im:
        assert im.width > 500 and im.height > 100


def test_inference_bad_paths(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_script("inference.py", "--model_path", tiny_model, tmp_path / "empty", check=False)
    assert p.returncode == 1 and "no images" in p.stderr
    p = run_script("inference.py", "--model_path", tiny_model, tmp_path / "nope.png", check=False)
    assert p.returncode == 1 and "no such file" in p.stderr


def test_inference_onnx_backend_reads_like_torch_without_importing_torch(tiny_dataset, tmp_path):
    """The shipped model through ONNX Runtime, in a process where `import torch` fails."""
    names = [n.split()[0] for n in read_lines(tiny_dataset / "im2latex_test_filter.lst")[:3]]
    images = [str(tiny_dataset / IMAGES_DIR / n) for n in names]
    torch_out, onnx_out = tmp_path / "torch.json", tmp_path / "onnx.json"
    run_script("inference.py", *images, "--beam_size", "2", "--device", "cpu",
               "--json", torch_out)
    no_torch = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", no_torch, str(ROOT / "inference.py"), *images,
                        "--backend", "onnx", "--beam_size", "2", "--json", str(onnx_out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    by_torch, by_onnx = (json.loads(f.read_text())["results"] for f in (torch_out, onnx_out))
    assert [r["predict"] for r in by_onnx] == [r["predict"] for r in by_torch]
    assert [r["name"] for r in by_onnx] == images
    conf = [[r["confidence"] for r in by] for by in (by_torch, by_onnx)]  # the shipped curve
    assert all(0 <= c <= 1 for c in conf[0]) and conf[1] == pytest.approx(conf[0], abs=1e-4)


def test_inference_onnx_backend_bad_flags(tiny_dataset, tmp_path):
    first = read_lines(tiny_dataset / "im2latex_test_filter.lst")[0].split()[0]
    image = tiny_dataset / IMAGES_DIR / first
    p = run_script("inference.py", image, "--backend", "onnx", "--attention_figure",
                   tmp_path / "a.png", check=False)
    assert p.returncode == 1 and "--attention_figure needs --backend torch" in p.stderr
    p = run_script("inference.py", image, "--backend", "onnx", "--onnx_path", tmp_path / "nope",
                   check=False)
    assert p.returncode == 1 and "no such folder" in p.stderr and "Traceback" not in p.stderr
