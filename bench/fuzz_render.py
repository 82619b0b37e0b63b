"""Fuzz the renderer with random hostile formulas: nothing leaks, nothing is left behind.

    python bench/fuzz_render.py [--n 300] [--seed 0] [--workers N]

Formulas are composed from a grammar of dangerous pieces (file and engine primitives, token-
built names, ``\\begin{X}``, ``\\string``, ``~``, ``$``, ``\\csname``, catcode tricks, deep
nesting, huge repeats, unbalanced groups) around a secret file that, if ever read, prints a
marker word to TeX's log and typesets a big black square. Half go through the screen as a user's
would, half straight to TeX (screen bypassed) so that TeX's limits and the OS sandbox are what
is tested. Checks: the secret's word is in no error message or log and its square in no image;
no file appears outside the render folders (the scratch cwd, HOME and TMPDIR are snapshotted,
and files named like the grammar's writes are searched for in /tmp, $HOME and the repository);
peak RSS of the TeX/Ghostscript children and the wall time of a batch stay bounded. The last
line is a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from data import render as R  # noqa: E402
from data import render_batches, sandbox  # noqa: E402

WORD = "QZXFUZZSECRET"
WRITE_NAME = "qzxfuzzout"  # every write the grammar attempts uses this name
PIECES = [
    r"\input{S}", r"\input S ", r"\begin{input}S\end{input}", r"\InputIfFileExists{S}{}{}",
    r"\IfFileExists{S}{Y}{N}", r"\openin1=S \read1 to\x \x", r"\csname input\endcsname{S}",
    r"\begin{csname}input\end{csname}{S}", r"\begin{pdffiledump}offset 0 length 9{S}"
    r"\end{pdffiledump}", r"\pdffiledump offset 0 length 9{S}", r"\begin{pdfximage}{S}",
    r"\pdfximage{S}\pdfrefximage\pdflastximage", r"\begin{scantokens}", r"\scantokens{\input S}",
    r"\string~", r"\string$", "~", "$", "$x$", r"\text{$S$}", r"\detokenize{~/S}",
    r"\catcode`\|=0 |input S", r"{\catcode`\~=12 \input{~/S}}", r"\font\f=S \f x",
    r"\special{pdf:S}", r"\immediate\write18{touch /tmp/" + WRITE_NAME + "}",
    r"\immediate\openout3=" + WRITE_NAME + r" \immediate\write3{x}\immediate\closeout3",
    r"\let\b\begin{array}{c}x\end{array}\b{input}{S}", r"\def\g#1#2{#1{input}}\g\begin{array}",
    r"{\aftergroup\begin{array}{c}x\end{array}}{input}{S}", r"\begin\x", r"\begin{\x}",
    r"\begin{jobname}", r"\makeatletter\@input{S}", r"\UseName{input}{S}", r"\expandafter",
    r"\uppercase{\begin{input}}", r"^^5cinput{S}", r"\end", r"\endinput", r"\begin{array}{c}",
    r"\end{array}", "{", "}", r"\left(", r"\right)", r"\frac{a}{b}", "x^{2}", r"\alpha",
    r"\def\x{\x}\x", r"\iffalse", r"\fi", r"\global\let\alpha\beta", r"\setcounter{page}{9}",
    r"\thepage", r"\footnotemark", r"\hbox to 100000pt{}", r"\kern-1000pt", "%", "#", "&", r"\\",
]
# Where a name from a formula could lead: absolute, relative, home and variable expansions.
PATHS = ["S", "../S", "../../S", "~/S", r"\string~root/S", "$HOME/S", r"\string$TMPDIR/S",
         "/etc/passwd", "/etc/pass*", "../sec*", "SYMLINK"]


@dataclass
class Summary:
    formulas: int = 0
    refused: int = 0
    rendered: int = 0
    failed: int = 0
    leaks: int = 0
    stray_files: list[str] = field(default_factory=list)
    peak_child_rss_mb: float = 0.0
    max_batch_s: float = 0.0
    total_s: float = 0.0

    def line(self) -> str:
        return (f"fuzz_render: {self.formulas} formulas ({self.refused} refused by the screen, "
                f"{self.rendered} rendered, {self.failed} failed in TeX), {self.leaks} leaks, "
                f"{len(self.stray_files)} stray files, peak child RSS "
                f"{self.peak_child_rss_mb:.0f} MB, slowest batch {self.max_batch_s:.1f} s, "
                f"total {self.total_s:.1f} s, OS sandbox "
                f"{'on' if sandbox.available() else 'OFF'}")


def compose(rng: random.Random, secret: Path, link: Path) -> str:
    """One random formula: a few pieces, file names filled in, sometimes nested or repeated."""
    parts = []
    for _ in range(rng.randint(1, 5)):
        piece = rng.choice(PIECES)
        path = rng.choice(PATHS).replace("SYMLINK", str(link))
        parts.append(piece.replace("S", str(secret) if path == "S" else path))
    formula = " ".join(parts)
    shape = rng.random()
    if shape < 0.1:
        formula = "{" * 200 + formula + "}" * 200  # deep nesting
    elif shape < 0.2:
        formula = (formula + " ") * rng.randint(20, 200)  # huge repeats (the screen caps length)
    elif shape < 0.25:
        formula = "\\begin{array}{c}" * 50 + formula  # unbalanced environments
    return formula


def snapshot(*roots: Path) -> set[str]:
    seen = set()
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(R.WORKDIR_PREFIX)]
            seen.update(os.path.join(dirpath, n) for n in dirs + files)
    return seen


def leaked_square(img: np.ndarray | None) -> bool:
    """The secret's 100pt square: at least 100 rows with 100 px of ink in a row."""
    if img is None:
        return False
    rows = (np.convolve(r, np.ones(100), "valid").max() >= 100 for r in (img < 128).astype(float))
    return sum(rows) >= 100


def _written_by_grammar(home: Path) -> list[str]:
    found = []
    for root in (Path("/tmp"), home, ROOT, Path.cwd()):
        found += [str(p) for p in root.glob(f"{WRITE_NAME}*")]
    return found


def fuzz(n: int, seed: int, scratch: Path, workers: int = 1) -> Summary:
    """Render ``n`` random hostile formulas with scratch as cwd, HOME and TMPDIR."""
    scratch = Path(scratch)
    cwd, home, tmp = (scratch / d for d in ("cwd", "home", "tmp"))
    for d in (cwd, home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    secret = home / "secret.tex"
    secret.write_text(f"\\message{{{WORD}}}\\rule{{100pt}}{{100pt}}{WORD}\n")
    link = tmp / "link.tex"
    link.symlink_to(secret)
    rng = random.Random(seed)
    formulas = [compose(rng, secret, link) for _ in range(n)]
    before = snapshot(cwd, home, tmp)
    old = (os.getcwd(), os.environ.get("HOME"), tempfile.tempdir)
    summary, logs = Summary(formulas=n), []
    run_tex = render_batches.run_tex

    def spy(formulas, geometry, opts, workdir):  # read each log before the folder is wiped
        start = time.monotonic()
        run = run_tex(formulas, geometry, opts, workdir)
        summary.max_batch_s = max(summary.max_batch_s, time.monotonic() - start)
        log = workdir / "batch.log"
        logs.append(log.read_text(errors="replace") if log.exists() else "")
        return run

    start = time.monotonic()
    try:
        os.chdir(cwd)
        os.environ["HOME"], tempfile.tempdir, render_batches.run_tex = str(home), str(tmp), spy
        opts = R.RenderOptions(workers=workers, formula_timeout_s=1.0, timeout_s=60)
        screened = R.render_results(formulas[: n // 2], opts)
        bypassed = render_batches.render_batch(list(enumerate(formulas[n // 2 :])), opts)
        results = screened + [bypassed[i] for i in range(n - n // 2)]
    finally:
        os.chdir(old[0])
        if old[1] is not None:
            os.environ["HOME"] = old[1]
        tempfile.tempdir, render_batches.run_tex = old[2], run_tex
    summary.total_s = time.monotonic() - start
    for r in results:
        refused = r.error is not None and r.error.startswith(("forbidden", "environment",
                                                              "unpaired", "formula longer"))
        summary.refused += refused
        summary.rendered += r.image is not None
        summary.failed += r.image is None and not refused
        summary.leaks += leaked_square(r.image) or WORD in (r.error or "")
    summary.leaks += sum(WORD in log or "root:x:0" in log for log in logs)
    after = snapshot(cwd, home, tmp)
    summary.stray_files = sorted(after - before) + _written_by_grammar(home)
    summary.peak_child_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="im2latex-fuzz-") as scratch:
        summary = fuzz(args.n, args.seed, Path(scratch), args.workers)
    for path in summary.stray_files:
        print(f"  stray file: {path}")
    print(summary.line())
    sys.exit(1 if summary.leaks or summary.stray_files else 0)


if __name__ == "__main__":
    main()
