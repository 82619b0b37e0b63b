r"""data/spelling.py: one spelling per font switch in training labels, without changing a pixel
of what the formula typesets; and train.py --label_spelling, which applies it to training
labels only."""

import json
import re
import shutil

import numpy as np
import pytest

from data.dataset import FormulaDataset
from data.normalize import detokenize
from data.spelling import lacking_tokens, respell
from data.vocab import Vocab
from model.checkpoint import load_checkpoint
from tests.conftest import HAVE_TEX, run_script
from tests.test_train_state import _one_thread, run  # noqa: F401 (fixture)

# (as written, in the references' spelling)
REFERENCES = [
    (r"\mathcal { L } ( x )", r"{ \cal L } ( x )"),
    (r"{ \mathcal { L } } + 1", r"{ \cal L } + 1"),  # the group is already the argument's own
    (r"x _ { \mathcal { A } } = \mathbf x", r"x _ { \cal A } = { \bf x }"),
    (r"\frac { \mathcal { A } } { 2 }", r"\frac { \cal A } { 2 }"),
    (r"\mathit { f f }", r"{ \it f f }"),
    (r"{ \rm d } x", r"\mathrm { d } x"),  # a free-standing group: the command's braces
    (r"x _ { \rm m a x } + \frac { \rm d } { d t }",
     r"x _ { \mathrm { m a x } } + \frac { \mathrm { d } } { d t }"),  # arguments' braces stay
    (r"\left( \rm a b \right) c", r"\left( \mathrm { a b } \right) c"),
    (r"a \rm b \leftarrow c", r"a \mathrm { b \leftarrow c }"),  # \leftarrow is no \left
    (r"\begin{array} { c c } \rm a & b \\ \rm c & d \end{array}",
     r"\begin{array} { c c } \mathrm { a } & b \\ \mathrm { c } & d \end{array}"),
    (r"\left| \rm a \middle| b \right|", r"\left| \mathrm { a } \middle| b \right|"),
    (r"{ \rm \mathcal { A } b }", r"\mathrm { { \cal A } b }"),
    (r"f ' ( x ) + g ' ' ^ { 2 } \to 0",
     r"f ^ { \prime } ( x ) + g ^ { \prime \prime 2 } \rightarrow 0"),
    (r"x _ { i } ' \, \mathcal { L } '", r"x _ { i } ^ { \prime } \, { \cal L } ^ { \prime }"),
]
# what the references already spell this way, and what no spelling should touch
UNCHANGED = [
    r"{ \cal L } = \mathrm { d } x",
    r"\mbox { \rm a b } + \text { \bf c ' }",  # text mode: no \mathrm there, ' is an apostrophe
    r"a ~ = ~ b",  # `~` is no `\ `: its \nobreak changes the space beside a relation
    r"\begin{tabular} { c } $ \rm x $ \end{tabular}",
    r"\boldsymbol { x } + \mathsf { A } + { \sf B }",  # fonts the table does not name
    r"x ^ { 2 } + \mathbb { R }",
]


@pytest.mark.parametrize("written, references", REFERENCES)
def test_font_switches_take_the_references_spelling(written, references):
    assert respell(written) == references
    assert respell(references) == references  # a fixed point


@pytest.mark.parametrize("formula", UNCHANGED)
def test_what_is_already_so_or_in_text_mode_is_left_alone(formula):
    assert respell(formula) == formula


def test_the_commands_spelling_goes_the_other_way():
    assert respell(r"{ \cal L } + { \bf x }", "commands") == \
        r"\mathcal { L } + \mathbf { x }"
    assert respell(r"\mathcal { L }", "commands") == r"\mathcal { L }"


# (as written, in references_braced): references plus braced accent arguments
BRACED = [
    (r"\hat x + \bar \alpha _ { 1 } = \dot { y }",
     r"\hat { x } + \bar { \alpha } _ { 1 } = \dot { y }"),
    (r"\overline u ' \tilde \nabla", r"\overline { u } ^ { \prime } \tilde { \nabla }"),
    (r"\hat \mathbf { x }", r"\hat { \bf x }"),  # a word that takes an argument: the font rule
    (r"\widehat x + \sqrt 2", r"\widehat x + \sqrt 2"),  # the references leave these bare too
    (r"\mbox { \hat a } + \vec a", r"\mbox { \hat a } + \vec { a }"),  # text mode copied
]


@pytest.mark.parametrize("written, braced", BRACED)
def test_references_braced_also_braces_accent_arguments(written, braced):
    assert respell(written, "references_braced") == braced
    assert respell(braced, "references_braced") == braced


def test_the_references_spelling_keeps_accents_as_written():
    """Runs trained on "references" resume with the labels they had."""
    assert respell(r"\hat x + \mathcal { L }") == r"\hat x + { \cal L }"


def test_a_macro_argument_that_is_no_group_keeps_its_braces():
    r"""`\ensuremath { \bf 0 } = 0` would make `= 0` bold too: argument braces are no group."""
    assert respell(r"\ensuremath { \mathbf { 0 } } = 0") == r"\ensuremath { { \bf 0 } } = 0"


def test_lacking_tokens_are_those_a_respelling_writes_that_the_vocabulary_has_not():
    vocab = Vocab(["<pad>", "<s>", "</s>", "<unk>", "{", "}", "L", "\\cal", "x", "^", "y"])
    assert lacking_tokens([r"{ \cal L }", r"{ \bf x } + y", "x ^ { \\prime }"], vocab) == [
        "\\bf", "\\prime"]
    assert lacking_tokens([r"{ \cal L }", "x + y"], vocab) == []


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and ghostscript")
def test_respelled_formulas_typeset_the_same_pixels():
    from data.render import RenderOptions, render_formulas

    written = [w for w, _ in REFERENCES] + [r"\ensuremath { \mathbf { 0 } } = 0"]
    respelled = [respell(w) for w in written]
    written += [w for w, _ in BRACED[:2]]  # (BRACED[2] as written is no valid LaTeX)
    respelled += [respell(w, "references_braced") for w, _ in BRACED[:2]]
    # the control: dropping the argument's braces, as the rule refuses to, changes the image
    written.append(r"\ensuremath { \mathbf { 0 } } = 0")
    respelled.append(r"\ensuremath { \bf 0 } = 0")
    images = render_formulas([detokenize(f) for f in written + respelled],
                             RenderOptions(strict=True))
    assert all(img is not None for img in images)
    same = [a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(images[:len(written)], images[len(written):])]
    assert same == [True] * (len(written) - 1) + [False]


def test_the_dataset_trains_on_relabelled_formulas(tiny_dataset):
    plain = FormulaDataset(tiny_dataset / "shards" / "train", Vocab.load(
        tiny_dataset / "vocab.json"))
    flipped = FormulaDataset(tiny_dataset / "shards" / "train", plain.vocab,
                             relabel=lambda f: " ".join(reversed(f.split())))
    i = max(range(len(plain)), key=lambda i: len(plain.formula(i)))
    assert flipped.formula(i) == " ".join(reversed(plain.formula(i).split()))
    assert flipped[i][1] == plain[i][1][::-1]
    assert np.array_equal(flipped[i][0], plain[i][0])


def test_train_respells_training_labels_and_refuses_a_vocabulary_without_them(
        tiny_dataset, tmp_path, capsys):
    formulas = [f for f in (tiny_dataset / "im2latex_formulas.norm.lst").read_text().split("\n")
                if "\\mathcal" in f.split()]
    assert formulas, "the generator writes \\mathcal: the tiny data should have some"
    assert run(tiny_dataset, tmp_path / "refused", "--label_spelling", "references",
               "--max_steps", "1") == 1
    err = capsys.readouterr().err
    assert "--label_spelling references writes \\bf \\cal, which the run's vocabulary lacks" in err
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["tokens"] += [t for t in ("\\cal", "\\bf", "\\it") if t not in vocab["tokens"]]
    (data / "vocab.json").write_text(json.dumps(vocab))
    assert run(data, tmp_path / "run", "--label_spelling", "references", "--max_steps", "2") == 0
    assert "labels in the references spelling" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["args"]["label_spelling"] == "references"
    assert run(data, tmp_path / "run", "--from_check_point", "--max_steps", "3") == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["args"]["label_spelling"] == "references"


@pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and ghostscript")
def test_spelling_check_counts_and_renders_what_it_respells(tiny_dataset):
    p = run_script("bench/spelling_check.py", "--data_path", tiny_dataset, "--sample", "4")
    header, train_row = p.stdout.split("\n")[1:3]
    counts = dict(zip(header.split()[1:], map(int, train_row.replace(",", "").split()[1:])))
    assert counts["\\mathcal"] > 0 and counts["\\cal"] == 0  # the generator's spelling
    last = p.stdout.strip().split("\n")[-1]
    assert re.fullmatch(r"spelling_check: train \d+ of \d+ formulas respelled \(references\); "
                        r"renders identical 4 of 4 sampled whose original renders", last), last


def test_an_answer_matches_a_reading_that_spells_its_fonts_otherwise():
    from inference import get_args, same_formula

    assert same_formula(r"{ \cal L } = \mathrm { d } x", r"\mathcal { L } = { \rm d } x")
    assert not same_formula(r"{ \cal L } = 0", r"\mathcal { C } = 0")
    assert get_args(["a.png"]).spelling == "as_read"
    assert get_args(["a.png", "--spelling", "commands"]).spelling == "commands"
