"""Custom data end to end: synthetic answer sheets -> jerry_preprocess.py -> fine-tune ->
inference.py --json with answer matching, plus the broken inputs users send."""

import json

import numpy as np
import pytest
from PIL import Image

from data.custom import (
    CustomDataError,
    clean_formula,
    label_images,
    load_answer_key,
    load_id2formula,
    load_name2id,
)
from data.render import render_formulas
from evaluate import get_args as get_eval_args
from evaluate import image_pipeline
from model.checkpoint import load_checkpoint
from tests.conftest import SHARED, run_script

GROUPS = {"fractions": ["frac { 1 } { 3 }", "- frac { 2 } { 7 }", "frac { 4 } { 9 }"],
          "roots": ["sqrt { 2 }", "2 sqrt { 3 }", "sqrt { 5 }"],
          "sets": ["\\{ 1 , 2 \\}", "\\{ 3 , 4 \\}", "\\{ 5 \\}"]}


def answer_sheet(img: np.ndarray, rng: np.random.Generator, invert: bool) -> Image.Image:
    """A scanned-answer look: scaled down to ~32 px high, noisy, sometimes light-on-dark."""
    pil = Image.fromarray(img)
    h = 32
    pil = pil.resize((max(8, round(pil.width * h / pil.height)), h), Image.BILINEAR)
    a = np.asarray(pil).astype(np.float32)
    a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255)
    if invert:
        a = 255 - a
    return Image.fromarray(a.astype(np.uint8))


@pytest.fixture(scope="module")
def sheets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sheets")
    rng = np.random.default_rng(0)
    name2id, id2formula = {}, [{}]
    for gid, (name, formulas) in enumerate(GROUPS.items()):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        name2id[name] = gid
        imgs = render_formulas([f.replace("frac", "\\frac").replace("sqrt", "\\sqrt")
                                for f in formulas])
        for item, (f, img) in enumerate(zip(formulas, imgs)):
            id2formula[0][f"({gid},{item})"] = f
            for copy in range(3):
                answer_sheet(img, rng, invert=copy % 2 == 0).save(
                    folder / f"{item}_{copy:03d}.png")
    (root / "NAME2ID.json").write_text(json.dumps(name2id, ensure_ascii=False))
    (root / "ID2FORMULA.json").write_text(json.dumps(id2formula))
    return root


def build(sheets, out, *extra, check=True):
    return run_script("jerry_preprocess.py", "--name2id", sheets / "NAME2ID.json",
                      "--id2formula", sheets / "ID2FORMULA.json", "--images",
                      sheets / "images", "--data_path", out, "--quiet", *extra, check=check)


def test_build_finetune_and_decode_to_json(sheets, tiny_model, tmp_path):
    data = tmp_path / "custom"
    p = build(sheets, data)
    assert "labelled images: 27, written: 27" in p.stdout
    assert "answer-key symbols): 18" in p.stdout  # frac/sqrt groups: 6 formulas x 3 copies
    formulas = (data / "im2latex_formulas.norm.lst").read_text().split("\n")
    assert "\\frac { 1 } { 3 }" in formulas and "frac { 1 } { 3 }" not in formulas
    n_train = len((data / "im2latex_train_filter.lst").read_text().split("\n")) - 1
    n_val = len((data / "im2latex_validate_filter.lst").read_text().split("\n")) - 1
    assert (n_train, n_val) == (24, 3)  # the 9:1 split (rounded)

    run = tmp_path / "ft"
    run_script("train.py", "--data_path", data, "--save_dir", run, "--init_from", tiny_model,
               "--freeze_encoder", "--batch_size", "8", "--epoches", "1", "--workers", "0",
               "--quiet", "--threads", "1")
    old = load_checkpoint(tiny_model)
    new = load_checkpoint(run / "last.pt")
    old_tokens, new_tokens = old["vocab"]["tokens"], new["vocab"]["tokens"]
    assert new_tokens[:len(old_tokens)] == old_tokens and len(new_tokens) >= len(old_tokens)
    enc = [k for k in old["model"] if k.startswith("encoder.")]
    assert enc and all(np.array_equal(old["model"][k].float(), new["model"][k].float())
                       for k in enc)  # frozen
    run_script("train.py", "--data_path", data, "--save_dir", run, "--from_check_point",
               "--epoches", "2", "--batch_size", "8", "--workers", "0", "--quiet")
    assert load_checkpoint(run / "last.pt")["epoch"] == 2

    out = tmp_path / "answers.json"
    run_script("inference.py", "--model_path", run / "last.pt", sheets / "images" / "roots",
               "--json", out, "--answer", "\\sqrt { 2 }", "--beam_size", "2")
    results = json.loads(out.read_text())["results"]
    assert len(results) == 9
    for r in results:
        assert set(r) >= {"name", "predict", "score", "match"} and isinstance(r["match"], bool)
        assert r["match"] == (r["predict"] == "\\sqrt { 2 }")

    # an answer key: per folder, with a per-image exception; keys are normalized and respelled
    # as the jerry data are ({{ }} is a set, a dropped backslash is put back)
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"roots": "sqrt { 3 }", "sets": "{{ 5 }}", "0_000.png": "x"}))
    run_script("inference.py", "--model_path", run / "last.pt", sheets / "images" / "roots",
               sheets / "images" / "sets", "--json", out, "--answer_key", key, "--beam_size", "1")
    results = json.loads(out.read_text())["results"]
    answers = {r["name"].split("/")[-2] + "/" + r["name"].split("/")[-1]: r["answer"]
               for r in results}
    assert answers["roots/1_000.png"] == "\\sqrt { 3 }" and answers["sets/2_001.png"] == "\\{ 5 \\}"
    assert answers["roots/0_000.png"] == "x" and answers["sets/0_000.png"] == "x"
    assert all(r["match"] == (r["predict"] == r["answer"]) for r in results)
    key.write_text("{broken")
    p = run_script("inference.py", "--model_path", run / "last.pt", sheets / "images" / "roots",
                   "--answer_key", key, check=False)
    assert p.returncode == 1 and "malformed JSON" in p.stderr


def test_single_label_appends(sheets, tmp_path):
    data = tmp_path / "single"
    build(sheets, data)
    before = (data / "im2latex_train_filter.lst").read_text().count("\n")
    more = tmp_path / "more"  # new scans: the sheets' own images are in the dataset already
    more.mkdir()
    rng = np.random.default_rng(1)
    for f in sorted((sheets / "images" / "roots").iterdir()):
        img = np.asarray(Image.open(f).convert("L")).astype(np.float32)
        Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
                        ).save(more / f.name)
    p = run_script("jerry_preprocess.py", "--single_label", more,
                   "--label", "- \\frac { 1 } { 3 }", "--data_path", data, "--quiet")
    assert "written: 9" in p.stdout
    lines = (data / "im2latex_train_filter.lst").read_text().split("\n")[:-1]
    formulas = (data / "im2latex_formulas.norm.lst").read_text().split("\n")
    assert len(lines) == before + 9
    assert {formulas[int(ln.split()[1])] for ln in lines[-9:]} == {"- \\frac { 1 } { 3 }"}


def test_broken_inputs_are_named(sheets, tmp_path):
    (tmp_path / "bad.json").write_text("{'single': quotes}")
    p = run_script("jerry_preprocess.py", "--name2id", tmp_path / "bad.json", "--id2formula",
                   sheets / "ID2FORMULA.json", "--images", sheets / "images", "--data_path",
                   tmp_path / "o", check=False)
    assert p.returncode == 1 and "malformed JSON" in p.stderr and "bad.json" in p.stderr
    assert "Traceback" not in p.stderr

    images = tmp_path / "images"
    images.mkdir()
    for name in GROUPS:
        (images / name).symlink_to(sheets / "images" / name)
    (images / "stranger").mkdir()
    (images / "fractions_extra").mkdir()
    (images / "fractions_extra" / "7_x.png").write_bytes(b"not an image at all")
    (images / "fractions_extra" / "9_y.png").write_bytes(b"")
    name2id = {**json.loads((sheets / "NAME2ID.json").read_text()), "fractions_extra": 0,
               "ghost": 1, "nowhere": 99}
    nid = tmp_path / "n.json"
    nid.write_text(json.dumps(name2id))
    p = run_script("jerry_preprocess.py", "--name2id", nid, "--id2formula",
                   sheets / "ID2FORMULA.json", "--images", images, "--data_path",
                   tmp_path / "o2", "--quiet", check=False)
    assert p.returncode == 0 and "written: 27" in p.stdout
    assert "stranger" in p.stderr and "not in NAME2ID" in p.stderr  # folder not in NAME2ID
    assert "'ghost'" in p.stderr and "not found" in p.stderr  # name without a folder
    assert "9_y.png" in p.stderr and 'no formula for key "(0,9)"' in p.stderr  # missing key
    assert "7_x.png" in p.stderr  # unreadable image (key (0,7) missing too, or unreadable)
    p = run_script("jerry_preprocess.py", "--name2id", nid, "--id2formula",
                   sheets / "ID2FORMULA.json", "--images", images, "--data_path",
                   tmp_path / "o3", "--quiet", "--strict", check=False)
    assert p.returncode == 1


def test_unreadable_image_with_valid_key_is_reported(sheets, tmp_path):
    images = tmp_path / "images"
    (images / "fractions").mkdir(parents=True)
    (images / "fractions" / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "fractions" / "1_ok.png").write_bytes(
        (sheets / "images" / "fractions" / "1_000.png").read_bytes())
    nid = tmp_path / "n.json"
    nid.write_text(json.dumps({"fractions": 0}))
    p = run_script("jerry_preprocess.py", "--name2id", nid, "--id2formula",
                   sheets / "ID2FORMULA.json", "--images", images, "--data_path", tmp_path / "o",
                   "--quiet", check=False)
    assert "0_broken.png" in p.stderr and "written: 1" in p.stdout


@pytest.mark.parametrize("key, expected", [
    ("- frac { 2 } { 7 }", "- \\frac { 2 } { 7 }"),
    ("3 sqrt { 5 7 }", "3 \\sqrt { 5 7 }"),
    ("{{ x | x <= 2 }}", "\\{ x | x \\leq 2 \\}"),
    ("( - inf , - 3 9 ] U ( 2 7 , + inf )", "( - \\infty , - 3 9 ] \\cup ( 2 7 , + \\infty )"),
    ("U _ { 1 } >= 0", "U _ { 1 } \\geq 0"),  # a U that joins no intervals is a letter
])
def test_answer_key_spellings(key, expected):
    assert clean_formula(key)[0] == expected


def test_answer_key_file_respells_as_training_labels(tmp_path):
    """inference.py's --answer_key and the jerry labels go through one respelling: the same
    text gives the same formula from the key file as from ID2FORMULA."""
    texts = ["- frac { 2 } { 7 }", "{{ x | x <= 2 }}", "( - inf , 2 ) U [ 3 , inf )", "x"]
    path = tmp_path / "key.json"
    path.write_text(json.dumps({f"q{i}": t for i, t in enumerate(texts)}))
    key = load_answer_key(path)
    assert key == {f"q{i}": clean_formula(t)[0] for i, t in enumerate(texts)}
    assert key["q0"] == "- \\frac { 2 } { 7 }" and key["q3"] == "x"
    path.write_text(json.dumps(["x"]))
    with pytest.raises(CustomDataError, match=r"key\.json: expected"):
        load_answer_key(path)
    path.write_text(json.dumps({"q": "\\frac { 1"}))
    with pytest.raises(CustomDataError, match="key.json"):
        load_answer_key(path)
    with pytest.raises(CustomDataError, match="not found"):
        load_answer_key(tmp_path / "missing.json")


def test_keys_are_parsed_not_evaluated(tmp_path):
    path = tmp_path / "id2f.json"
    path.write_text(json.dumps([{"__import__('os').system('touch pwned')": "x"}]))
    with pytest.raises(CustomDataError, match="not of the form"):
        load_id2formula(path)
    assert not (tmp_path / "pwned").exists()
    path.write_text(json.dumps({"a": "1"}))
    with pytest.raises(CustomDataError, match="not an integer"):
        load_name2id(path)


def test_the_shared_example_is_understood():
    example = SHARED / "custom_example"
    if not example.is_dir():
        pytest.skip("../shared/data not available")
    name2id = {"手写填空-分式-1": 0, "手写填空-数字序列-1": 1, "手写填空-根式-1": 2,
               "手写填空-集合-1": 3}
    report = label_images(example / "images", name2id,
                          load_id2formula(example / "ID2FORMULA.json"))
    by_folder = {lab.image.parent.name: lab for lab in report.labelled}
    assert "手写填空-根式-1" in by_folder
    assert by_folder["手写填空-根式-1"].key == "(2,0)"
    assert all(lab.formula for lab in report.labelled)


def test_evaluate_reads_user_images_as_inference_does(tiny_model, tmp_path):
    """One image path: a folder of light-on-dark, enlarged formulas scores through evaluate.py
    exactly as inference.py reads it (same predictions, same confidences)."""
    formulas = ["x + 1", "\\frac { a } { b }", "y ^ { 2 }", "\\sqrt { 3 }"]
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, img in enumerate(render_formulas(formulas, progress=False)):
        pil = Image.fromarray(255 - img)  # light ink on dark
        pil.resize((pil.width * 3, pil.height * 3), Image.BILINEAR).save(folder / f"{i}.png")
    (tmp_path / "f.txt").write_text("".join(f + "\n" for f in formulas))
    (tmp_path / "m.txt").write_text("".join(f"{i}.png {i}\n" for i in range(len(formulas))))
    decode = ["--model_path", tiny_model, "--beam_size", "1", "--max_len", "30"]
    p = run_script("evaluate.py", "--images", folder, "--matching", tmp_path / "m.txt",
                   "--formulas", tmp_path / "f.txt", *decode, "--quiet", "--ref_path",
                   tmp_path / "r", "--result_path", tmp_path / "h", "--metrics_path",
                   tmp_path / "m.json")
    assert "normalized as inference.py does" in p.stderr
    run_script("inference.py", folder, *decode, "--json", tmp_path / "inf.json")
    results = json.loads((tmp_path / "inf.json").read_text())["results"]
    assert [r["name"].rsplit("/", 1)[1] for r in results] == [f"{i}.png" for i in range(4)]
    assert (tmp_path / "h").read_text().split("\n")[:-1] == [r["predict"] for r in results]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["normalized"] is True
    assert metrics["mean_score"] == pytest.approx(np.mean([r["score"] for r in results]),
                                                  abs=1e-3)
    as_is = get_eval_args(["--images", str(folder), "--no_normalize"])
    assert image_pipeline(as_is)[0] is False and "--no_normalize" in image_pipeline(as_is)[1]
