"""Labels-file datasets (data/labels.py, jerry_preprocess.py --labels): both file layouts, any
split ratios, the manifest, rebuilds that replace or refuse, appends that never put one image
in two splits, and a handwriting-like set from build to a held-out score."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data.custom import CustomDataError
from data.labels import read_labels
from data.layout import SPLITS, read_lines, split_file
from tests.conftest import HAVE_TEX, run_script

N = 12


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """N images of `x + i` drawn with PIL (no TeX needed) and a NAME<TAB>formula labels file,
    names with and without their extension."""
    root = tmp_path_factory.mktemp("drawn")
    (root / "imgs").mkdir()
    font = ImageFont.load_default(size=28)
    lines = []
    for i in range(N):
        im = Image.new("L", (170, 50), 255)
        ImageDraw.Draw(im).text((8, 8), f"x+{i}", fill=0, font=font)
        im.save(root / "imgs" / f"img{i:02d}.png")
        lines.append(f"img{i:02d}{'.png' if i % 2 else ''}\tx + {' '.join(str(i))}")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    return root


def build(root, out, *extra, labels="labels.tsv", check=True):
    return run_script("jerry_preprocess.py", "--labels", root / labels, "--images",
                      root / "imgs", "--data_path", out, "--quiet", *extra, check=check)


def split_names(data):
    return {s: [ln.split()[0] for ln in read_lines(data / split_file(s))] for s in SPLITS}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_both_layouts_and_every_problem_named(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for name in ("a.png", "b.JPG", "c.png", "c.bmp", "sub/d.png"):
        (imgs / name).write_bytes(b"")  # read_labels only pairs names; images are read later
    (tmp_path / "l.tsv").write_text("\ufeffa\tfrac { 1 } { 2 }\r\nb\tx\n\nsub/d.png\ty\n"
                                    "no tab here\nc\tz\nghost\tw\na.png\tx\n")
    r = read_labels(tmp_path / "l.tsv", imgs)
    assert [(lab.image.name, lab.formula) for lab in r.labelled] == [
        ("a.png", "\\frac { 1 } { 2 }"), ("b.JPG", "x"), ("d.png", "y")]
    assert r.restored == 1
    problems = "\n".join(r.problems)
    assert "l.tsv:5: expected 'NAME<TAB>FORMULA'" in problems  # malformed, with its line
    assert "l.tsv:6: image 'c' is ambiguous" in problems
    assert "l.tsv:7: image 'ghost' not found" in problems
    assert "l.tsv:8: duplicate: 'a.png' is already labelled on line 1" in problems

    (tmp_path / "f.txt").write_text("x ^ 2\n\\alpha\n")
    (tmp_path / "m.txt").write_text("a.png 1\nb 0\nsub/d 7\nc.png x\n")
    r = read_labels(tmp_path / "m.txt", imgs, tmp_path / "f.txt")
    assert [(lab.image.name, lab.formula) for lab in r.labelled] == [
        ("a.png", "\\alpha"), ("b.JPG", "x ^ { 2 }")]
    assert any("m.txt:3: formula index 7 is out of range" in p for p in r.problems)
    assert any("m.txt:4: expected 'NAME FORMULA_INDEX'" in p for p in r.problems)
    with pytest.raises(CustomDataError, match="not found"):
        read_labels(tmp_path / "nope.tsv", imgs)


@pytest.mark.parametrize("ratio, counts", [
    (["0.8", "0.1", "0.1"], (10, 1, 1)), (["1", "0", "0"], (N, 0, 0)),
    (["0", "0", "1"], (0, 0, N)), (["0.5"], (6, 6, 0))])
def test_split_ratios_and_manifest(drawn, tmp_path, ratio, counts):
    data = tmp_path / "d"
    p = build(drawn, data, "--split_ratio", *ratio)
    names = split_names(data)
    assert tuple(len(names[s]) for s in SPLITS) == counts
    assert f"written: {N}" in p.stdout
    manifest = read_lines(data / "manifest.tsv")
    assert manifest[0] == "image\tsplit\tsource"
    rows = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in manifest[1:]}
    assert len(rows) == N
    for split, split_list in names.items():
        for name in split_list:
            assert rows[name][0] == split and (data / "formula_images_processed" / name).is_file()
    assert sorted(r[1].rsplit("/", 1)[1] for r in rows.values()) == [
        f"img{i:02d}.png" for i in range(N)]


def test_bad_ratio_and_problems_are_one_line_errors(drawn, tmp_path):
    p = build(drawn, tmp_path / "d", "--split_ratio", "0.8", "0.2", check=False)
    assert p.returncode == 1 and "--split_ratio" in p.stderr and "Traceback" not in p.stderr
    (drawn / "bad.tsv").write_text("img00\tx\nimg01 x\nghost\ty\nimg00\tz\n")
    p = build(drawn, tmp_path / "d2", labels="bad.tsv", check=False)
    assert p.returncode == 0 and "written: 1" in p.stdout
    assert "bad.tsv:2: expected" in p.stderr and "bad.tsv:3: image 'ghost'" in p.stderr
    assert "bad.tsv:4: duplicate" in p.stderr
    p = build(drawn, tmp_path / "d3", "--strict", labels="bad.tsv", check=False)
    assert p.returncode == 1


def test_rebuild_refuses_or_replaces_never_leaks(drawn, tmp_path):
    data = tmp_path / "d"
    build(drawn, data, "--split_ratio", "0.6", "0.2", "0.2")
    before = snapshot(data)
    p = build(drawn, data, "--seed", "1", check=False)
    assert p.returncode == 1 and "already holds a dataset" in p.stderr and "--overwrite" in p.stderr
    assert snapshot(data) == before  # nothing changed
    build(drawn, data, "--seed", "1", "--split_ratio", "0.6", "0.2", "0.2", "--overwrite")
    names = split_names(data)
    assert sum(len(v) for v in names.values()) == N  # replaced, not appended
    assert len(set().union(*names.values())) == N  # no image in two splits
    assert len(list((data / "formula_images_processed").iterdir())) == N
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    p = build(drawn, tmp_path / "mine", "--overwrite", check=False)
    assert p.returncode == 1 and "no dataset" in p.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_append_never_puts_an_image_in_two_splits(drawn, tmp_path):
    data = tmp_path / "d"
    build(drawn, data, "--split_ratio", "0.5", "0.5", "0")
    p = run_script("jerry_preprocess.py", "--single_label", drawn / "imgs", "--label", "y",
                   "--split", "test", "--data_path", data, "--quiet", check=False)
    assert p.returncode == 1 and "in the train split, skipped" in p.stderr
    names = split_names(data)
    assert names["test"] == [] and len(set().union(*names.values())) == N
    new = tmp_path / "new"
    new.mkdir()
    Image.new("L", (60, 30), 255).save(new / "blank.png")  # unreadable: no ink
    im = Image.open(drawn / "imgs" / "img03.png").rotate(3, fillcolor=255)
    im.save(new / "tilted.png")
    im.save(new / "tilted_copy.png")  # same content twice in one append
    p = run_script("jerry_preprocess.py", "--single_label", new, "--label", "y", "--split",
                   "test", "--data_path", data, "--quiet", check=False)
    names = split_names(data)
    assert p.returncode == 0 and len(names["test"]) == 1
    assert "tilted_copy.png: same image as" in p.stderr and "blank.png" in p.stderr
    assert len(read_lines(data / "manifest.tsv")) == 1 + N + 1


def handwriting_like(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A render made to look handwritten-and-scanned: thicker strokes, a small rotation and
    shear, enlarged, white ink on black."""
    pil = Image.fromarray(img).filter(ImageFilter.MinFilter(3))
    pil = pil.resize((pil.width * 2, pil.height * 2), Image.BILINEAR)
    shear = rng.uniform(-0.15, 0.15)
    pil = pil.transform(pil.size, Image.AFFINE, (1, shear, 0, 0, 1, 0), fillcolor=255)
    pil = pil.rotate(rng.uniform(-3, 3), expand=True, fillcolor=255)
    a = 255 - np.asarray(pil).astype(np.float32)
    return Image.fromarray(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8))


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_handwriting_like_labels_set_build_finetune_score(tiny_model, tmp_path):
    """The README walk-through's three commands on generated data."""
    from data.render import render_formulas

    formulas = ["x + 1", "a ^ { 2 }", "\\frac { 1 } { 3 }", "\\sqrt { 2 }", "y - 4",
                "b _ { 1 }", "2 x", "\\alpha + \\beta", "z = 3", "\\frac { a } { b }",
                "x ^ { 2 } + 1", "\\sqrt { x }"]
    imgs = tmp_path / "scans"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (f, img) in enumerate(zip(formulas, render_formulas(formulas, progress=False))):
        handwriting_like(img, rng).save(imgs / f"{i:03d}.bmp")
        lines.append(f"{i:03d}\t{f}")
    (tmp_path / "labels.tsv").write_text("\n".join(lines) + "\n")
    data, run = tmp_path / "mine", tmp_path / "run"
    run_script("jerry_preprocess.py", "--labels", tmp_path / "labels.tsv", "--images", imgs,
               "--data_path", data, "--split_ratio", "0.6", "0.2", "0.2", "--quiet")
    run_script("train.py", "--data_path", data, "--save_dir", run, "--init_from", tiny_model,
               "--epoches", "1", "--batch_size", "4", "--workers", "0", "--quiet",
               "--threads", "1")
    p = run_script("evaluate.py", "--data_path", data, "--split", "test", "--model_path",
                   run / "best.pt", "--beam_size", "2", "--quiet", "--ref_path",
                   tmp_path / "ref.txt", "--result_path", tmp_path / "hyp.txt",
                   "--metrics_path", tmp_path / "m.json")
    n_test = len(split_names(data)["test"])
    assert n_test >= 2 and f"images: {n_test}" in p.stdout
    assert json.loads((tmp_path / "m.json").read_text())["images"] == n_test
    manifest = [ln.split("\t") for ln in read_lines(data / "manifest.tsv")[1:]]
    by_source = {src.rsplit("/", 1)[1]: (name, split) for name, split, src in manifest}
    assert sorted(by_source) == sorted(f"{i:03d}.bmp" for i in range(len(formulas)))
    refs = dict(zip(split_names(data)["test"], read_lines(tmp_path / "ref.txt")))
    for src, (name, split) in by_source.items():  # every test image traced to its source
        if split == "test":
            assert refs[name] == formulas[int(src[:3])]
