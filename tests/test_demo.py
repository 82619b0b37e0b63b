"""demo.py: the shipped model reads a seeded sample of test formulas, on a fresh clone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import demo
from data.layout import read_lines
from data.normalize import detokenize
from tests.conftest import HAVE_TEX, ROOT, SHARED

TEST_FORMULAS = SHARED / "im2latex100k" / "test.formulas.norm.txt"
needs_tex = pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")


def clone_without_shared(dest: Path) -> Path:
    """The code and the shipped model copied where no ../shared lies beside them, as a user's
    clone is: whatever the demo reads must come with the repository."""
    repo = dest / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    packages = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    for folder in [*packages, ROOT / "web"]:
        shutil.copytree(folder, repo / folder.name, ignore=ignore)
    (repo / "checkpoints").mkdir()
    for f in [*ROOT.glob("*.py"), *(ROOT / "checkpoints").glob("*.*")]:  # not the ONNX folder
        if f.is_file():
            shutil.copy(f, repo / f.relative_to(ROOT))
    assert not (repo.parent / "shared").exists()
    return repo


def run_demo(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "demo.py", "--threads", "1", *args], cwd=repo,
                          capture_output=True, text=True, timeout=300)


def table_rows(out: str) -> list[tuple[str, str, str, str]]:
    """(image, exact, picture, LaTeX) of every table row; truth rows have empty verdicts."""
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*(?:\d+\s+)?(truth|clean|screenshot)\s+"
                     r"(?:[\d.]+\s+(yes|no)\s+(same|differs)\s+)?(.*)$", line)
        if m:
            rows.append((m.group(1), m.group(2) or "", m.group(3) or "", m.group(4)))
    return rows


@needs_tex
def test_demo_reads_the_drawn_formulas_counts_exact_ones_and_repeats_under_a_seed(tmp_path):
    repo = clone_without_shared(tmp_path)
    first = run_demo(repo, "--seed", "3", "--count", "3", "--beam_size", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = table_rows(first.stdout)
    truths = demo.draw(demo.read_formula_file(demo.FORMULAS), 3, seed=3)
    assert [r[3] for r in rows if r[0] == "truth"] == [detokenize(t) for t in truths]
    assert [r[0] for r in rows] == ["truth", "clean", "screenshot"] * 3
    counts = re.search(r"^read exactly right: (\d+)/3 clean, (\d+)/3 screenshot$", first.stdout,
                       re.M)
    pictures = re.search(r"^typeset the same as the truth: (\d+)/3 clean, (\d+)/3 screenshot$",
                         first.stdout, re.M)
    assert counts and pictures, first.stdout
    for k, view in enumerate(("clean", "screenshot")):
        readings = [r for r in rows if r[0] == view]
        assert [r[1] for r in readings].count("yes") == int(counts.group(k + 1))
        assert [r[2] for r in readings].count("same") == int(pictures.group(k + 1))
        for (_, exact, picture, latex), truth in zip(readings, truths):
            assert (exact == "yes") == (latex == detokenize(truth))
            assert exact == "no" or picture == "same"  # the same tokens typeset the same
    assert re.search(r"python serve\.py .*http://127\.0\.0\.1:\d+", first.stdout)

    again = run_demo(repo, "--seed", "3", "--count", "3", "--beam_size", "1")
    timing = re.compile(r"^\(rendered and read in .*$", re.M)
    assert timing.sub("", again.stdout) == timing.sub("", first.stdout)


def test_a_seed_draws_the_same_formulas_and_another_seed_others():
    formulas = demo.read_formula_file(demo.FORMULAS)
    assert demo.draw(formulas, 12, seed=5) == demo.draw(formulas, 12, seed=5)
    assert demo.draw(formulas, 12, seed=5) != demo.draw(formulas, 12, seed=6)
    assert len(set(demo.draw(formulas, 12, seed=5))) == 12
    assert demo.draw(formulas, 1000, seed=5) == demo.draw(formulas, len(formulas), seed=5)


@pytest.mark.skipif(not TEST_FORMULAS.is_file(), reason="needs IM2LATEX-100K test formulas")
def test_the_committed_formulas_are_the_seeded_draw_from_the_test_split():
    test = [f for f in read_lines(TEST_FORMULAS) if f.strip()]
    assert demo.read_formula_file(demo.FORMULAS) == demo.draw(test, 200, seed=14)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert demo.main(["--formulas", str(tmp_path / "none.txt"), "--seed", "1"]) == 1
    assert "none.txt not found" in capsys.readouterr().err
    header_only = tmp_path / "empty.txt"
    header_only.write_text("# a header and nothing else\n\n")
    assert demo.main(["--formulas", str(header_only), "--seed", "1"]) == 1
    assert "no formulas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        demo.main(["--count", "0"])
    assert stop.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_a_formula_that_did_not_render_is_shown_and_left_out_of_the_counts():
    read = demo.Example("a + b", np.zeros((4, 4), np.uint8),
                        readings={"clean": "a + b", "screenshot": "a - b"},
                        same_picture={"clean": True, "screenshot": False})
    lost = demo.Example("\\foo", None, note="did not render: Undefined control sequence")
    table, summary = demo.format_table([read, lost]), demo.summary([read, lost])
    assert "(did not render: Undefined control sequence)" in table
    assert summary[0] == "read exactly right: 1/1 clean, 0/1 screenshot"
    assert summary[1] == "typeset the same as the truth: 1/1 clean, 0/1 screenshot"
    assert summary[2] == "(1 of 2 formulas did not render: not counted)"
