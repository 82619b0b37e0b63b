"""data.render: batching, isolation of bad formulas, the sandbox, resumable output, fidelity."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import render as R
from data import sandbox
from data.image import BUCKETS, read_gray_png
from data.render import (
    RenderOptions,
    render_formulas,
    render_results,
    render_to_dir,
    screen,
    wrap_multiline,
)
from data.render_batches import render_batch
from data.tex_process import limits, tex_env

pytestmark = pytest.mark.skipif(
    shutil.which("pdflatex") is None or shutil.which("gs") is None,
    reason="needs pdflatex and gs",
)

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "im2latex100k_sample"
FAST = RenderOptions(workers=1, formula_timeout_s=1.0, timeout_s=60)
GOOD = [
    r"x ^ { 2 } + y ^ { 2 } = r ^ { 2 }",
    r"\frac { a } { b } + \sqrt { c }",
    r"\sum _ { i = 1 } ^ { n } i = \frac { n ( n + 1 ) } { 2 }",
    r"\alpha \beta \gamma",
    r"\left( \begin{array} { c c } { 1 } & { 0 } \\ { 0 } & { 1 } \\ \end{array} \right)",
    r"e ^ { i \pi } + 1 = 0",
]


@pytest.fixture(scope="module")
def solo() -> dict[str, np.ndarray]:
    """Every good formula rendered in a TeX run of its own: the reference for isolation."""
    return {f: render_formulas([f], FAST)[0] for f in GOOD}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Point tempfile at an empty directory so the test can see what is left behind."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool((a == b).all())


def test_output_follows_the_dataset_conventions(solo):
    img = solo[GOOD[0]]
    assert img.dtype == np.uint8 and img.ndim == 2
    assert img[:2].min() >= 250 and img[:, :2].min() >= 250  # 8 px pad at 2x = 4 px here
    ink = np.argwhere(img < 128)
    assert 3 <= ink[:, 0].min() <= 5 and 3 <= ink[:, 1].min() <= 5
    assert img.max() == 255 and img.min() < 30
    (bucketed,) = render_formulas([GOOD[0]], RenderOptions(workers=1, bucket=True))
    assert (bucketed.shape[1], bucketed.shape[0]) in BUCKETS
    h, w = img.shape  # top-left; only LANCZOS's reach of the old border differs
    assert same(bucketed[: h - 3, : w - 3], img[: h - 3, : w - 3])
    assert bucketed[h + 2 :].min() == 255 and bucketed[:, w + 2 :].min() == 255


def test_failures_stay_alone_and_batch_mates_are_pixel_identical(solo):
    bad = [r"\frac { a } { b", r"\undefinedmacro x", r"\def \x { \x } \x"]
    batch = [GOOD[0], bad[0], GOOD[1], GOOD[2], bad[1], GOOD[3], bad[2], GOOD[4], GOOD[5]]
    start = time.monotonic()
    strict = render_results(batch, RenderOptions(workers=1, strict=True, formula_timeout_s=1.0))
    lenient = render_results(batch, FAST)
    assert time.monotonic() - start < 40
    for f, s, le in zip(batch, strict, lenient):
        if f in bad:
            assert s.image is None and s.error
        else:
            assert same(s.image, solo[f]) and same(le.image, solo[f]), f
    errors = {f: r.error for f, r in zip(batch, strict) if f in bad}
    assert "Undefined control sequence" in errors[bad[1]]
    assert errors[bad[2]].startswith("timed out")
    # Lenient mode recovers like the original pipeline: the undefined macro is dropped.
    undefined = lenient[batch.index(bad[1])].image
    assert same(undefined, render_formulas(["x"], FAST)[0])
    assert lenient[batch.index(bad[0])].image is None and lenient[batch.index(bad[2])].image is None


def test_order_and_none_for_screened_input(solo):
    formulas = [GOOD[3], "", "x" * 5000, GOOD[5], r"\inp^^75t { /etc/passwd }"]
    out = render_results(formulas, FAST)
    assert same(out[0].image, solo[GOOD[3]]) and same(out[3].image, solo[GOOD[5]])
    assert [r.image is None for r in out] == [False, True, True, False, True]
    assert "empty" in out[1].error and "longer" in out[2].error and "^^" in out[4].error


def test_screen_rejects_engine_and_file_primitives():
    for evil in [r"\input{x}", r"\openin 1 = x", r"\immediate \write 1 { x }", r"\jobname",
                 r"\csname x\endcsname", r"\catcode `\| = 0", r"\pdffiledump{x}", r"\end",
                 r"^^5cinput"]:
        assert screen(evil), evil
    for ok in GOOD + [r"\end{array}", r"\endgroup", r"\renewcommand { \arraystretch } { 1 . 2 }"]:
        assert screen(ok) is None, ok
    assert screen(r"\begin {array} { c } x \end {array}") is None


def test_screen_allows_only_known_environments_and_no_token_built_names():
    for evil in [r"\begin{input}/etc/passwd\end{input}", r"\begin{csname}x\end{csname}",
                 r"\begin{scantokens}", r"\begin{jobname}", r"\begin{pdfliteral}", r"\end{input}",
                 r"\begin{pdffiledump}offset 0 length 6{x}\end{pdffiledump}", r"\begin\x",
                 r"\begin{\x}", r"\begin{in put}", r"\begin\relax{input}", r"\begin"]:
        assert screen(evil) and "environment" in screen(evil), evil
    # Ways to take \begin apart from its name, or to spell a name or a file name from tokens.
    for evil in [r"\InputIfFileExists{\string~systemd-network/etc/passwd}{}{}",
                 r"\IfFileExists{a}{}{}", r"\string~", r"\detokenize{~}", r"\meaning x",
                 r"\fontname\font", r"\font\x=cmr10", r"\makeatletter", r"\@input{x}",
                 r"\let\b\begin{array}", r"\expandafter x", r"{\aftergroup\begin{array}}{input}",
                 r"\def\g#1{#1}", r"\special{x}", r"\listfiles", r"\UseName{input}",
                 r"\ExplSyntaxOn", r"\AddToHook{x}{y}", r"x $ y", r"$$ x $$"]:
        assert screen(evil), evil
    for ok in [r"a ~ b", r"\text { if $ x > 0 $ }", r"\$ 5", r"\\$ x $", r"\# x"]:
        assert screen(ok) is None, ok


def test_tilde_and_dollar_never_reach_tex_raw_and_render_the_same():
    assert R.tex_body(r"a ~ b \~ { c } \text { if $ x $, \$ 1 }") == (
        r"a \nobreakspace{} b \~ { c } \text { if \( x \), \$ 1 }")
    tilde, spelled, text, dollars = render_formulas(
        [r"a ~ b", r"a \nobreakspace{} b", r"\text { if $ x > 0 $ }",
         r"\text { if \( x > 0 \) }"], FAST)
    assert same(tilde, spelled) and same(text, dollars)
    assert text.shape[1] > 2 * render_formulas([r"\text { if }"], FAST)[0].shape[1]


def test_counters_start_afresh_for_every_formula():
    """\\thepage and \\footnotemark print 1 alone and as the 5th formula of a batch."""
    probes = [r"x = \thepage", r"\footnotemark", r"x = \theequation"]
    alone = [render_formulas([f], FAST)[0] for f in probes]
    batch = render_formulas(GOOD[:4] + probes + probes, FAST)
    for i, img in enumerate(alone):
        assert same(batch[4 + i], img) and same(batch[7 + i], img), probes[i]
    assert R.needs_isolation(r"\global \let \alpha \beta") and not R.needs_isolation(GOOD[0])


def test_multiline_bodies_are_wrapped_only_when_needed(solo):
    assert wrap_multiline(GOOD[4]) == GOOD[4]  # rows inside an array: untouched
    assert wrap_multiline(r"a \& b") == r"a \& b"
    assert wrap_multiline(r"a & = b \\ c & = d").startswith(r"\begin{aligned}")
    assert wrap_multiline(r"a = b \\ c = d").startswith(r"\begin{gathered}")
    one, two = render_formulas([r"a = b", r"a & = b \\ c & = d"], FAST)
    assert two.shape[0] > 1.6 * one.shape[0]


# ------------------------------------------------------------------------- sandbox


def attack_results(formulas: list[str]) -> dict[int, R.RenderResult]:
    """Bypass the lexical screen: these tests are about the TeX sandbox itself."""
    return render_batch(list(enumerate(formulas)), FAST)


def test_sandbox_contains_file_and_shell_attacks(tmp_path, private_tmp, solo):
    secret = tmp_path / "secret.tex"
    secret.write_text("LEAKED")
    out_file = tmp_path / "written.tex"
    touched = tmp_path / "touched"
    attacks = [
        r"\input{/etc/passwd}",
        rf"\input{{{secret}}}",
        r"\input{../../secret}",
        rf"\immediate\write18{{touch {touched}}} x",
        rf"\immediate\openout5={out_file} \immediate\write5{{hi}}\immediate\closeout5 x",
        rf"\newread\r \openin\r={secret} \read\r to\x \x",
        rf"{{\catcode`\|=0 |input{{{secret}}}}}",
        rf"\pdfximage{{{secret}}}\pdfrefximage\pdflastximage",
    ]
    formulas = [GOOD[0]] + attacks + [GOOD[1]]
    results = attack_results(formulas)
    leaked = render_formulas([r"\mathrm { L E A K E D }"], FAST)[0]
    for i in range(1, len(attacks) + 1):
        img = results[i].image
        assert img is None or not same(img, leaked), attacks[i - 1]
        assert img is None or img.shape[1] < 60, attacks[i - 1]  # at most the trailing "x"
    assert results[1].image is None  # /etc/passwd is not typeset
    assert same(results[0].image, solo[GOOD[0]])
    assert same(results[len(formulas) - 1].image, solo[GOOD[1]])
    assert not touched.exists() and not out_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.tex", "tmp"]
    assert list(private_tmp.iterdir()) == []  # every work directory removed


def test_sandbox_contains_resource_attacks(private_tmp, solo):
    attacks = [
        r"\def\x{\x}\x",
        r"\hbox to 1000000pt{}",
        r"\def\a#1{\expandafter\def\csname x#1\endcsname{}\a{#1x}}\a x",
        r"\def\b#1{\b{#1#1}}\b x",
        r"\jobname \input{\jobname}",
        "x + " * 2500 + "x",
        r"\iffalse",
        r"\end{displaymath} \newpage \begin{displaymath}",
    ]
    formulas = [GOOD[2]] + attacks + [GOOD[3]]
    start = time.monotonic()
    results = attack_results(formulas)
    assert time.monotonic() - start < 30
    assert same(results[0].image, solo[GOOD[2]])
    assert same(results[len(formulas) - 1].image, solo[GOOD[3]])
    for i in (1, 3, 4, 5, 8):
        assert results[i].image is None, attacks[i - 1]
    assert list(private_tmp.iterdir()) == []


def test_rlimits_reach_the_child():
    out = subprocess.run(
        ["sh", "-c", "ulimit -v; ulimit -t; ulimit -f"], capture_output=True, text=True,
        preexec_fn=limits(memory_mb=300, cpu_s=7, file_mb=2),
    ).stdout.split()
    assert out == [str(300 * 1024), "8", str(2 * 1024 * 1024 // 512)]


def test_tex_environment_is_locked_down(tmp_path):
    env = tex_env(tmp_path)
    assert env["openin_any"] == env["openout_any"] == "p" and env["shell_escape"] == "f"
    assert env["HOME"] == str(tmp_path) and "TEXINPUTS" not in env


# ------------------------------------------------------------------- to a directory


def test_render_to_dir_writes_skips_and_reports(tmp_path, solo):
    out = tmp_path / "images"
    out.mkdir()
    Image.new("L", (3, 3), 7).save(out / "b.png")  # already there: must be kept
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f".c.png.{dead.pid}-0badc0de.tmp").write_bytes(b"half")  # a killed render's
    formulas = [GOOD[0], GOOD[1], r"\frac { a", GOOD[5]]
    names = ["a", "b", "broken", "d"]
    report = render_to_dir(formulas, names, out, FAST, progress=False)
    assert (report.rendered, report.skipped, report.failed) == (2, 1, 1)
    assert report.failed_names == ["broken"] and "broken" in report.errors
    assert same(read_gray_png(out / "a.png"), solo[GOOD[0]])
    assert read_gray_png(out / "b.png").shape == (3, 3)
    # No temp files, none left; .failed: the record of "broken" (data.failed_renders).
    assert sorted(os.listdir(out)) == [".failed", "a.png", "b.png", "d.png"]
    again = render_to_dir(formulas, names, out, FAST, progress=False)
    assert (again.rendered, again.skipped, again.failed) == (0, 3, 1)
    with pytest.raises(ValueError):
        render_to_dir([GOOD[0]], ["../escape"], out, FAST, progress=False)


def test_png_write_is_atomic(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        R._write_png(np.zeros((4, 4), np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- fidelity


def test_matches_the_original_dataset_images():
    if not SAMPLE.is_dir():
        pytest.skip("../shared/data/im2latex100k_sample not present")
    formulas = (SAMPLE / "im2latex_formulas.norm.lst").read_text().split("\n")
    pairs = []
    for line in (SAMPLE / "im2latex_train_filter.lst").read_text().split("\n")[:40]:
        name, index = line.split()
        if (SAMPLE / "formula_images_processed" / name).exists():
            pairs.append((name, formulas[int(index)]))
    images = render_formulas([f for _, f in pairs], RenderOptions(bucket=True))
    diffs, same_bucket = [], 0
    for (name, _), img in zip(pairs, images):
        ref = read_gray_png(SAMPLE / "formula_images_processed" / name)
        h, w = max(ref.shape[0], img.shape[0]), max(ref.shape[1], img.shape[1])
        a, b = np.full((h, w), 255.0), np.full((h, w), 255.0)
        a[: ref.shape[0], : ref.shape[1]], b[: img.shape[0], : img.shape[1]] = ref, img
        diffs.append(np.abs(a - b).mean())
        same_bucket += ref.shape == img.shape
    assert len(pairs) >= 30
    assert np.median(diffs) < 1.5 and np.mean(diffs) < 4
    assert same_bucket / len(pairs) >= 0.85


# ------------------------------------------------------------- OS sandbox, temp folders


def test_without_bwrap_renders_unsandboxed_and_says_so_once(monkeypatch, solo):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    sandbox.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="WITHOUT the OS sandbox"):
            (first,) = render_formulas([GOOD[0]], FAST)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (second,) = render_formulas([GOOD[0]], FAST)
        assert same(first, solo[GOOD[0]]) and same(second, solo[GOOD[0]])
        assert sandbox.sandboxed(["pdflatex"], Path(".")) == ["pdflatex"]
    finally:
        sandbox.available.cache_clear()


def test_a_killed_render_leaves_a_folder_the_next_render_removes(private_tmp, solo):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from data.render import *; "
            "render_formulas(['x ^ { %d }' % i for i in range(5000)], RenderOptions(workers=1))")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TMPDIR=str(private_tmp))
    victim = subprocess.Popen([sys.executable, "-c", code, root], env=env)
    live = subprocess.Popen(["sleep", "60"])
    try:
        pattern = f"{R.WORKDIR_PREFIX}{victim.pid}-*"
        deadline = time.monotonic() + 30
        while not list(private_tmp.glob(pattern)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let TeX fill the folder
        victim.kill()
        victim.wait()
        (stale,) = private_tmp.glob(pattern)
        other = private_tmp / f"{R.WORKDIR_PREFIX}{live.pid}-busy"
        other.mkdir()  # a live build's folder: must stay
        unrelated = private_tmp / f"{R.WORKDIR_PREFIX}notapid"
        unrelated.mkdir()
        (img,) = render_formulas([GOOD[0]], FAST)
        assert same(img, solo[GOOD[0]])
        assert not stale.exists() and other.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()
        victim.kill()
        victim.wait()
