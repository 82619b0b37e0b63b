"""The model shipped in checkpoints/: loads safely, is small, and reads rendered formulas with
no flags at all (what a user of a fresh clone runs first)."""

import pytest
import torch

from data.normalize import detokenize
from model.checkpoint import DEFAULT_MODEL, load_checkpoint, load_model
from tests.conftest import HAVE_TEX, run_script

FORMULAS = [
    "x ^ { 2 } + y ^ { 2 } = z ^ { 2 }",
    "E = m c ^ { 2 }",
    "\\frac { a } { b } + \\frac { c } { d }",
    "\\int _ { 0 } ^ { 1 } f ( x ) d x",
    "\\sum _ { i = 1 } ^ { n } i = \\frac { n ( n + 1 ) } { 2 }",
    "\\alpha + \\beta = \\gamma",
    "\\sqrt { x ^ { 2 } + 1 }",
    "e ^ { i \\pi } + 1 = 0",
]


def test_shipped_weights_are_half_precision_and_load_without_pickle():
    assert DEFAULT_MODEL.is_file(), "checkpoints/im2latex.pt is missing"
    assert DEFAULT_MODEL.stat().st_size < 16 * 2**20
    ckpt = load_checkpoint(DEFAULT_MODEL)  # torch.load(weights_only=True) inside
    assert "optimizer" not in ckpt
    floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    model, vocab = load_model(DEFAULT_MODEL)
    assert model.cfg.batch_norm and len(vocab) == model.cfg.vocab_size > 500


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
def test_inference_with_no_flags_reads_rendered_formulas(tmp_path):
    from data.render import render_to_dir

    names = [f"f{i}" for i in range(len(FORMULAS))]
    report = render_to_dir([detokenize(f) for f in FORMULAS], names, tmp_path, progress=False)
    assert report.rendered == len(FORMULAS)
    p = run_script("inference.py", *(tmp_path / f"{n}.png" for n in names), cwd=tmp_path)
    got = dict(line.split("\t") for line in p.stdout.strip().splitlines())
    right = sum(got[str(tmp_path / f"{n}.png")] == f for n, f in zip(names, FORMULAS))
    assert right >= 6, got  # all 8 on the machine it was trained on; allow a TeX difference
