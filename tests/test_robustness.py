"""The robustness benchmark: its image conditions and its table (bench/robustness.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from bench import robustness
from data.conditions import CONDITIONS, condition
from data.image import ImageError, load_image, model_input, normalize_user_image
from tests.conftest import HAVE_TEX


def formula_like(seed: int = 0) -> np.ndarray:
    """A clean-render stand-in: black glyph-sized boxes on white, at the training scale."""
    rng = np.random.default_rng(seed)
    img = np.full((40, 200), 255, np.uint8)
    for x in range(8, 180, 14):
        h = int(rng.integers(8, 14))
        img[20 - h // 2:20 + h // 2, x:x + 9] = 0
    return img


@pytest.mark.parametrize("name", list(CONDITIONS))
def test_condition_is_a_readable_file_that_differs_from_clean(name):
    clean = formula_like()
    data = CONDITIONS[name].make(clean, np.random.default_rng(0))
    fmt = Image.open(io.BytesIO(data)).format
    assert fmt == ("JPEG" if name == "screenshot" else "PNG")
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    if name == "clean":
        assert np.array_equal(decoded, clean)  # the reference the others depart from
    else:
        assert decoded.shape != clean.shape or not np.array_equal(decoded, clean)
    # every condition must reach the model through the user path (not refused as noise)
    try:
        out = model_input(normalize_user_image(load_image(data, name)))
    except ImageError as e:
        pytest.fail(f"{name}: the user path refused the image: {e}")
    assert out.dtype == np.uint8 and out.ndim == 2


@pytest.mark.parametrize("name", [n for n in CONDITIONS if n != "clean"])
def test_conditions_are_seeded(name):
    clean = formula_like(1)
    a = CONDITIONS[name].make(clean, np.random.default_rng([7, 1]))
    b = CONDITIONS[name].make(clean, np.random.default_rng([7, 1]))
    assert a == b


def test_inverted_is_light_on_dark_and_load_image_turns_it_back():
    data = CONDITIONS["inverted"].make(formula_like(), np.random.default_rng(0))
    raw = np.asarray(Image.open(io.BytesIO(data)))
    assert np.median(raw) < 128  # a dark page
    assert np.median(load_image(data)) > 128  # read as dark ink on light paper


def test_unknown_condition_is_a_one_line_error(capsys):
    assert robustness.main(["--conditions", "clean", "no_such_thing"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_thing" in err and "screenshot" in err


def test_scale_rows_resample_at_any_factor_and_low_res_is_one_of_them():
    clean = formula_like()
    rng = np.random.default_rng(0)
    for factor in (0.5, 0.8, 1.5):
        data = condition(f"scale:{factor}").make(clean, rng)
        h, w = np.asarray(Image.open(io.BytesIO(data))).shape
        assert (h, w) == (round(40 * factor), round(200 * factor))
    assert condition("scale:0.6").make(clean, rng) == CONDITIONS["low_res"].make(clean, rng)
    assert condition("no_such_thing") is None


@pytest.mark.parametrize("name", ["scale:", "scale:small", "scale:0.1", "scale:9", "scale:nan"])
def test_a_scale_row_needs_a_factor_in_range(name, capsys):
    with pytest.raises(ValueError, match="scale"):
        robustness.check_conditions(["clean", name])
    assert robustness.main(["--conditions", "clean", name]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_scale_rows_follow_the_table_in_the_order_asked():
    asked = ["scale:0.8", "low_res", "clean", "scale:0.7", "scale:0.80"]
    assert robustness.check_conditions(asked) == ["clean", "low_res", "scale:0.8", "scale:0.7"]
    assert not any(n.startswith("scale:") for n in robustness.known_conditions())  # opt-in


def test_every_style_has_a_row():
    known = robustness.known_conditions()
    assert "style:times" in known and robustness.VAL_IMAGES in known
    assert "style:cm" not in known  # the default style is the clean row


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_table_has_every_requested_row(tiny_model, tmp_path, capsys):
    formulas = tmp_path / "formulas.txt"
    formulas.write_text("x ^ { 2 }\n\\frac { a } { b }\na + b = c\n\\alpha _ { 1 }\n")
    # a stand-in for the other pipeline's folder: two images and their matching lines
    images = tmp_path / "val_images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(formula_like(i)).save(images / f"{i}.png")
    (tmp_path / "match.txt").write_text("0.png 0\n1.png 2\n")
    wanted = ["clean", "screenshot", "inverted", "style:times", "val_images"]
    out_json = tmp_path / "table.json"
    code = robustness.main([
        "--n", "4", "--beam_size", "1", "--model_path", str(tiny_model), "--quiet",
        "--formulas", str(formulas), "--conditions", *wanted, "--json", str(out_json),
        "--val_images", str(images), "--val_matching", str(tmp_path / "match.txt"),
        "--val_formulas", str(formulas)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    for name in wanted:
        assert any(line.split()[:1] == [name] for line in printed), name
    doc = json.loads(out_json.read_text())
    rows = doc["rows"]
    assert [r["condition"] for r in rows] == wanted
    mean = sum(r["bleu4"] for r in rows) / len(rows)
    assert doc["mean_bleu4"] == pytest.approx(mean, abs=0.01)
    assert printed[-1].split()[:2] == ["mean", f"{doc['mean_bleu4']:.2f}"]
    assert [r["images"] for r in rows] == [4, 4, 4, 4, 2]
    for r in rows:
        assert 0 <= r["bleu4"] <= 100 and 0 <= r["exact_match"] <= 100


def test_no_normalize_feeds_each_image_as_it_is():
    """The diagnostic table: an enlarged screenshot reaches the model enlarged, not brought to
    the training scale; the default path still normalizes it."""
    data = CONDITIONS["screenshot"].make(formula_like(), np.random.default_rng(0))
    raw, = robustness.user_input(data, "s", normalize=False)  # one reading: as it is
    normalized = robustness.user_input(data, "s")[0]
    assert raw.shape[1] > 1.4 * normalized.shape[1]  # x1.6 and margins, left so
    assert robustness.get_args(["--no_normalize"]).normalize is False
    assert robustness.get_args([]).normalize is True
