"""Hostile formulas against data.render: nothing of the host's files reaches an image or a log.

Two layers are tested apart: the lexical screen (every attack is refused) and, with the screen
bypassed, TeX's own limits plus the OS sandbox; the last test lifts kpathsea's limit too, so
that only the sandbox stands between a document and the host's files.
"""

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data import render as R
from data import render_batches, sandbox, tex_process
from data.tex_document import Geometry

pytestmark = pytest.mark.skipif(
    shutil.which("pdflatex") is None or shutil.which("gs") is None,
    reason="needs pdflatex and gs",
)
needs_bwrap = pytest.mark.skipif(not sandbox.available(), reason="bwrap cannot start here")

ROOT = Path(__file__).resolve().parents[1]
FAST = R.RenderOptions(workers=1, formula_timeout_s=1.0, timeout_s=60)
WORD = "QZXSECRETWORD"
# Typeset, the secret is a big black square; \input, it also prints WORD to the log.
SECRET_TEX = f"\\message{{{WORD}}}\\rule{{150pt}}{{150pt}}{WORD}\n"


@pytest.fixture
def secret(tmp_path, monkeypatch) -> Path:
    """A secret file, and a symlink to it where a relative name from a work folder leads."""
    path = tmp_path / "secret.tex"
    path.write_text(SECRET_TEX)
    root = tmp_path / "tmp"
    root.mkdir()
    (root / "secret.tex").symlink_to(path)
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return path


def attacks(secret: Path) -> list[str]:
    s = str(secret)
    return [
        r"\begin{input}/etc/passwd\end{input}",
        rf"\begin{{input}}{s}\end{{input}}",
        r"\begin{pdffiledump}offset 0 length 6{\string$SELFAUTOPARENT/PATH}\end{pdffiledump}",
        r"\InputIfFileExists{\string~systemd-network/etc/passwd}{}{}",
        rf"\InputIfFileExists{{{s}}}{{}}{{}}",
        rf"\IfFileExists{{{s}}}{{\input{{{s}}}}}{{}}",
        r"\begin{csname}input\end{csname}{../secret}",
        rf"\csname openin\endcsname 1={s} \read 1 to \x \x",
        rf"\begin{{pdfximage}}{{{s}}}\end{{pdfximage}}",
        r"\begin{scantokens}{\input{../secret}}\end{scantokens}",
        r"\begin{jobname}\end{jobname}",
        r"\begin{pdfliteral}{0 0 m 1 1 l S}\end{pdfliteral}",
        r"\input{~/../secret}", r"\input{\string~/../secret}", r"\input{$HOME/../secret}",
        r"\input{\string$HOME/../secret}", r"\input{../secret}", r"\input{../secr*}",
        r"\input{/etc/pass*}", rf"\font\x={s} \x A", r"\special{pdf: 0 0 m}",
        r"\immediate\write18{touch /tmp/qzxpwned} x",
        r"\immediate\openout5=qzxout \immediate\write5{x} x",
        r"\let\b\begin{array}{c}x\end{array}\b{input}{../secret}",
        r"{\aftergroup\begin{array}{c}x\end{array}}{input}{../secret}",
        r"\def\g#1#2{#1{input}}\g\begin{array}{c}x\end{array}{../secret}",
        r"\UseName{input}{../secret}", r"\makeatletter\@input{../secret}",
        r"\text{\input{../secret}}", r"\mathrm{\string~}", r"\detokenize{~}/../secret",
        r"\pagenumbering{@@input}\thepage{../secret}", r"\pagestyle{input}",
    ]


def leaked(img: np.ndarray | None) -> bool:
    """The secret's black square (about 200 px a side here), or a line as long as a passwd
    entry (formulas of these tests make at most a few words)."""
    if img is None:
        return False
    if img.shape[1] > 500:
        return True
    ink = np.pad(img < 128, ((0, 0), (1, 1))).astype(np.int8)
    edges = np.diff(ink, axis=1)
    solid_rows = 0
    for row in edges:  # longest run of ink in each row
        starts, ends = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        solid_rows += int((ends - starts).max(initial=0) >= 100)
    return solid_rows >= 100


@pytest.fixture
def logs(monkeypatch) -> list[str]:
    """Every TeX log of the test, read before the work folder is wiped."""
    seen: list[str] = []
    run_tex = render_batches.run_tex

    def spy(formulas, geometry, opts, workdir):
        run = run_tex(formulas, geometry, opts, workdir)
        log = workdir / "batch.log"
        seen.append(log.read_text(errors="replace") if log.exists() else "")
        return run

    monkeypatch.setattr(render_batches, "run_tex", spy)  # where _compile_pages finds it
    return seen


def test_the_screen_refuses_every_attack(secret):
    evil = attacks(secret)
    results = R.render_results(evil, FAST)
    for f, r in zip(evil, results):
        assert r.image is None and r.error, f
        assert any(w in r.error for w in ("forbidden", "environment", "unpaired")), (f, r.error)


def test_behind_the_screen_tex_reads_and_writes_nothing(secret, logs):
    """The screen bypassed: TeX's limits and the sandbox alone keep every file out."""
    evil = attacks(secret)
    good = r"x ^ { 2 }"
    results = render_batches.render_batch(list(enumerate([good, *evil, good])), FAST)
    (ref,) = R.render_formulas([good], FAST)
    for i, f in enumerate(evil, 1):
        assert not leaked(results[i].image), f
        assert WORD not in (results[i].error or ""), f
    assert np.array_equal(results[0].image, ref)
    assert np.array_equal(results[len(evil) + 1].image, ref)
    assert logs and not any(WORD in log or "root:x:0" in log for log in logs)
    assert not Path("/tmp/qzxpwned").exists()
    assert sorted(p.name for p in Path(tempfile.tempdir).iterdir()) == ["secret.tex"]


def _read_first_line(path: str) -> str:
    """A document body that reads a file's first line into the log, if it can open it."""
    return (rf"\newread\imr \openin\imr={path} \ifeof\imr \message{{QZXNOFILE}}"
            rf"\else \read\imr to\l \message{{QZXREAD[\l]}}\fi x")


@needs_bwrap
@pytest.mark.parametrize("use_sandbox", [True, False])
def test_only_the_sandbox_keeps_absolute_paths_out(tmp_path, secret, monkeypatch, use_sandbox):
    """kpathsea's openin_any lifted and the screen bypassed: what can TeX still open?"""
    env = tex_process.tex_env
    monkeypatch.setattr(tex_process, "tex_env", lambda w: {**env(w), "openin_any": "a"})
    work = tmp_path / "work"
    work.mkdir()
    targets = ["/etc/passwd", str(secret), str(Path(__file__).resolve())]
    opts = dataclasses.replace(FAST, sandbox=use_sandbox)
    tex_process.run_tex([_read_first_line(t) for t in targets], Geometry(), opts, work)
    log = (work / "batch.log").read_text(errors="replace")
    opened = ["root:x:0" in log, WORD in log, "Hostile formulas" in log]
    if use_sandbox:
        assert opened == [False] * 3 and log.count("QZXNOFILE") == 3
    else:  # the control: without the sandbox this test would catch the leak
        assert opened == [True] * 3


@needs_bwrap
def test_the_sandbox_shows_only_the_tex_tree_and_the_work_folder(tmp_path, secret):
    work = tmp_path / "work"
    work.mkdir()
    (work / "link").symlink_to(secret)  # a symlink out of the work folder leads nowhere

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(sandbox.sandboxed(list(argv), work), cwd=work,
                              capture_output=True, text=True, timeout=30)

    top = set(run("ls", "/").stdout.split())
    assert top <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "var",
                   "proc", "dev", "tmp", "home"}
    assert set(run("ls", "/etc").stdout.split()) <= {"ld.so.cache", "texmf"}
    assert run("ls", "-A", "/home/tex").stdout == "" and run("ls", "/tmp").stdout.split() in (
        [], [p for p in str(work).split("/") if p][1:2])
    assert run("cat", "link").returncode != 0 and run("cat", str(secret)).returncode != 0
    assert run("ls", str(ROOT)).returncode != 0
    for elsewhere in ("/usr/qzx", "/usr/bin/qzx", "/qzx", "/home/qzx"):
        assert run("touch", elsewhere).returncode != 0, elsewhere
    assert run("touch", "made").returncode == 0 and (work / "made").exists()
    interfaces = [line.split(":")[0].strip() for line in run("cat", "/proc/net/dev").stdout
                  .splitlines()[2:]]
    assert interfaces == ["lo"]  # a network namespace of its own: no way out


def test_fuzz_pass_is_clean(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fuzz_render
    finally:
        sys.path.remove(str(ROOT / "bench"))
    summary = fuzz_render.fuzz(n=40, seed=1, scratch=tmp_path, workers=1)
    assert summary.leaks == 0 and summary.stray_files == [], summary
    assert summary.peak_child_rss_mb < FAST.memory_mb and summary.max_batch_s < 60, summary
