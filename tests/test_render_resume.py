"""A rerun of a render or a build does not render again what failed for good (data.failed_renders):
it reports those failures as before, keyed by the options and the formula, a torn record and a
passing failure (a timeout) are never trusted, and the images and split files come out as a
build without records makes them."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from data import failed_renders as F
from data import render as R
from data.build import build_dataset
from data.layout import IMAGES_DIR
from data.recover import train_style
from data.render import RenderOptions, RenderResult, render_to_dir
from tests.conftest import HAVE_TEX, run_script

needs_tex = pytest.mark.skipif(not HAVE_TEX, reason="needs pdflatex and gs")
ROOT = Path(__file__).resolve().parents[1]
FAST = RenderOptions(workers=1, formula_timeout_s=1.0, timeout_s=60)
BAD = r"\undefinedmacro x"  # a TeX error: strictly rendered, it fails for good

# Every reason the render stages give a formula, as the source spells it ({...} -> 1), and
# whether a rerun is bound to repeat it (None: aborts the whole render, never one formula's).
REASONS = {
    "re-read the TeX input": True,
    "did not produce exactly one page": True,
    "left a group or conditional open": True,
    "rendered nothing visible": True,
    "did not produce": True,
    "re-read": True,
    "timed out after 1 s": False,
    "timed out": False,
    "TeX stopped early": False,
    "no PDF produced": False,
    "TeX error": False,
    "1 pages for 1 formulas": False,
    "unexpected output from Ghostscript": False,
    "Ghostscript timed out": False,
    "Ghostscript failed (exit 1): 1": False,
    "pdflatex failed before the first formula:\\n1": None,
}


def _spelled_reasons() -> set[str]:
    """The string literals on the lines of the render stages that make a failure's reason."""
    found = set()
    for module in ("tex_process", "render_batches", "rasterize"):
        for line in (ROOT / "data" / f"{module}.py").read_text().splitlines():
            if re.search(r"reason|RenderResult\(None|RenderError\(", line):
                for lit in re.findall(r'f?"((?:[^"\\]|\\.)*)"', line):
                    found.add(re.sub(r"\{[^}]*\}", "1", lit))
    return found


def test_every_reason_the_renderer_gives_is_classified():
    """A new reason in the stages fails here until data.failed_renders is told about it."""
    assert _spelled_reasons() == set(REASONS)
    for reason, lasting in REASONS.items():
        if lasting is not None:
            assert F.is_lasting("x", reason, FAST) == lasting, reason


def test_tex_errors_last_limits_and_screen_refusals_do_not():
    assert F.is_lasting("x", "Undefined control sequence.", FAST)
    assert F.is_lasting("x", "LaTeX Error: Environment foo undefined.", FAST)
    for reason in ("TeX capacity exceeded, sorry [main memory size=5000000].", "failed", None,
                   "pdfTeX error: out of memory", ""):
        assert not F.is_lasting("x", reason, FAST), reason
    assert not F.is_lasting(r"\input x", "Undefined control sequence.", FAST)  # screened


def test_fingerprint_follows_what_changes_an_outcome_only():
    base = F.fingerprint(FAST)
    for changed in (replace(FAST, strict=True), replace(FAST, style="times"),
                    replace(FAST, style=train_style("cm")), replace(FAST, bucket=True),
                    replace(FAST, formula_timeout_s=2.0), replace(FAST, memory_mb=512),
                    replace(FAST, max_chars=100), replace(FAST, dpi=300)):
        assert F.fingerprint(changed) != base, changed
    assert F.fingerprint(replace(FAST, workers=7, batch_size=3)) == base
    assert F.fingerprint(RenderOptions(style="cm-300dpi")) != F.fingerprint(RenderOptions())


@pytest.fixture
def spy(monkeypatch) -> list[list[str]]:
    """The formulas each render_to_dir call hands to TeX."""
    calls: list[list[str]] = []
    real = R.iter_render

    def recording(formulas, opts, progress=False):
        calls.append(list(formulas))
        return real(formulas, opts, progress)

    monkeypatch.setattr(R, "iter_render", recording)
    return calls


def _records(out: Path) -> dict[str, str]:
    """name -> error of every record line in the folder's files (the header lines skipped)."""
    got = {}
    for path in (out / F.FOLDER).glob("*.jsonl"):
        for line in path.read_text().splitlines()[1:]:
            rec = json.loads(line)
            got[rec["name"]] = rec["error"]
    return got


@needs_tex
def test_a_rerun_reports_lasting_failures_without_rendering_them(tmp_path, spy):
    out = tmp_path / "images"
    opts = replace(FAST, strict=True)
    formulas = ["x ^ { 2 }", BAD, r"\frac { a", "a $ b"]  # the last: refused by the screen
    names = ["good", "bad", "open", "screened"]
    first = render_to_dir(formulas, names, out, opts, progress=False)
    assert first.failed_names == ["bad", "open", "screened"] and first.remembered == 0
    assert set(_records(out)) == {"bad", "open"}
    again = render_to_dir(formulas, names, out, opts, progress=False)
    assert spy[-1] == ["a $ b"]  # only the screen sees it again; TeX sees nothing
    assert (again.errors, again.failed_names, again.skipped, again.remembered) == (
        first.errors, first.failed_names, 1, 2)
    retried = render_to_dir(formulas, names, out, opts, progress=False, retry_failed=True)
    assert spy[-1] == formulas[1:] and retried.errors == first.errors
    assert set(_records(out)) == {"bad", "open"}  # rewritten by the retry
    lenient = render_to_dir(formulas[1:2], names[1:2], out, FAST, progress=False)
    assert lenient.rendered == 1 and spy[-1] == [BAD]  # other options: the record is not used


@needs_tex
def test_a_torn_record_or_another_formula_under_the_name_is_rendered_again(tmp_path, spy):
    out = tmp_path / "images"
    opts = replace(FAST, strict=True)
    formulas = {"bad": BAD, "open": r"\frac { a"}
    render_to_dir(list(formulas.values()), list(formulas), out, opts, progress=False)
    (path,) = (out / F.FOLDER).glob("*.jsonl")
    text = path.read_text()
    last = json.loads(text.splitlines()[-1])["name"]
    path.write_text(text[: len(text) - 10])  # a kill in the middle of the last line
    report = render_to_dir(list(formulas.values()), list(formulas), out, opts, progress=False)
    assert spy[-1] == [formulas[last]] and report.remembered == 1 and report.failed == 2
    assert path.read_text() == text  # the torn line dropped, the record appended afresh
    render_to_dir(["x ^ { 2 }"], ["bad"], out, opts, progress=False)  # same name, new formula
    assert (out / "bad.png").is_file() and spy[-1] == ["x ^ { 2 }"]


def test_a_failure_that_may_pass_next_time_is_not_remembered(tmp_path, monkeypatch):
    reasons = ["timed out after 3.1 s", "TeX stopped early", "Ghostscript timed out",
               "TeX capacity exceeded, sorry [input stack size=5000]."]

    def failing(formulas, opts, progress=False):
        yield from ((i, RenderResult(None, reasons[i])) for i in range(len(formulas)))

    monkeypatch.setattr(R, "iter_render", failing)
    names = [f"f{i}" for i in range(len(reasons))]
    report = render_to_dir(["x"] * len(reasons), names, tmp_path, FAST, progress=False)
    assert report.failed == len(reasons) and report.errors == dict(zip(names, reasons))
    assert not (tmp_path / F.FOLDER).exists()


def _build(data_dir: Path) -> list[str]:
    lines = ["x ^ { 2 } + y", BAD, "\\frac { a } { b }", "\\undefinedtoo + 1", "\\alpha - \\beta",
             "\\sqrt { x", "e ^ { i \\pi }"]
    report = build_dataset(lines, data_dir, ratios=(0.7, 0.3, 0), seed=1,
                           fixed={"test": ["\\undefinedmacro y + 1", "a + b"]},
                           progress=False, render_opts=FAST, styles=("cm", "times"))
    return report.lines()


def _contents(data_dir: Path) -> dict[str, bytes]:
    """Every image and layout file of a build (the records aside) by name."""
    files = [*data_dir.glob("*.lst"), *(data_dir / IMAGES_DIR).glob("*.png")]
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in files}


@needs_tex
def test_a_build_resumed_with_records_equals_one_built_without(tmp_path, spy):
    plain = tmp_path / "plain"
    expected = _build(plain)
    assert any("dropped: failed to render: Undefined" in ln for ln in expected)
    resumed = tmp_path / "resumed"
    assert _build(resumed) == expected and _contents(resumed) == _contents(plain)
    records = _records(resumed / IMAGES_DIR)
    assert records and all(any(f"failed to render: {e[:40]}" in ln for ln in expected)
                           for e in records.values())
    spy.clear()
    assert _build(resumed) == expected  # a second run: TeX gets nothing to do
    assert spy and not any(spy)
    # As a kill leaves it: images not yet written, the last record line torn.
    lost = sorted((resumed / IMAGES_DIR).glob("*.png"))[::3]
    for p in lost:
        p.unlink()
    (torn,) = [p for p in (resumed / IMAGES_DIR / F.FOLDER).glob("*.jsonl")
               if len(p.read_text().splitlines()) >= 2][:1]
    torn.write_text(torn.read_text()[:-5])
    spy.clear()
    assert _build(resumed) == expected and _contents(resumed) == _contents(plain)
    assert sum(map(len, spy)) == len(lost) + 1  # the lost images and the torn record's formula


@needs_tex
def test_preprocess_retry_failed_renders_recorded_failures_again(tmp_path):
    src = tmp_path / "formulas.txt"
    src.write_text(f"x ^ {{ 2 }}\n{BAD}\n")
    args = ["--render", src, "--data_path", tmp_path / "d", "--no_shards", "--workers", "1",
            "--split_ratio", "1", "0", "0"]
    first = run_script("preprocess.py", *args)
    again = run_script("preprocess.py", *args)
    retried = run_script("preprocess.py", *args, "--retry_failed")
    assert first.stdout == again.stdout == retried.stdout
    assert "dropped: failed to render: Undefined" in first.stdout
    skipped = "1 formulas failed for good (a TeX error) in an earlier run"
    assert skipped not in first.stderr and skipped in again.stderr
    assert skipped not in retried.stderr
    assert list(_records(tmp_path / "d" / IMAGES_DIR).values()) == ["Undefined control sequence."]
