"""One pdflatex run of a batch document, sandboxed, limited, and watched formula by formula.

Sandbox: formulas are untrusted. pdflatex (and Ghostscript, data.rasterize, with the same
limits and environment) runs under bubblewrap (``data.sandbox``: fresh namespaces, no network,
only the TeX tree, Ghostscript's resources and the work directory visible; where it cannot
start, a warning, once). Inside, TeX runs in the batch's work directory with kpathsea's
``openin_any=p`` / ``openout_any=p``, ``shell_escape=f`` and ``-no-shell-escape``, no font
generation, a minimal environment, and rlimits on address space, CPU time, file size and core
dumps; a run is killed when one formula takes longer than ``formula_timeout_s`` or the run
longer than ``timeout_s``.

Isolation: ``\\message`` flushes the terminal, so the markers data.tex_document puts before
each formula are read live, which also gives every formula its own time limit. A formula
"derails" the run when the next marker shows other than one new page, an open group or
conditional, or comes out of order, or when it times out; the run reports which one and how
many pages before it are trustworthy (data.render_batches decides what to do about it). A TeX
error that leaves the state clean does not derail; it is reported for ``strict`` rendering.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.render_options import RenderError, RenderOptions
from data.sandbox import sandboxed
from data.styles import get_style
from data.tex_document import Geometry, make_document, marker_pattern

_ERROR_LINE = re.compile(r"^!.*$", re.M)  # "! Undefined ...", "!pdfTeX error: ..."


@dataclass(frozen=True)
class TexRun:
    """One pdflatex run. Pages ``0..valid-1`` of ``pdf`` are trustworthy; ``errors`` holds the
    (recovered) TeX error of formulas among them; ``derailed`` is the formula after which
    TeX's state was no longer clean (None: the run went through)."""

    pdf: Path | None
    valid: int
    errors: dict[int, str] = field(default_factory=dict)
    derailed: int | None = None
    reason: str | None = None


def limits(memory_mb: int, cpu_s: float, file_mb: int = 256):
    """preexec_fn setting the child's rlimits; values are bound before the fork."""
    mem = memory_mb * 1024 * 1024
    cpu = max(1, int(cpu_s) + 1)
    fsize = file_mb * 1024 * 1024
    rl = resource

    def apply() -> None:
        rl.setrlimit(rl.RLIMIT_AS, (mem, mem))
        rl.setrlimit(rl.RLIMIT_CPU, (cpu, cpu))
        rl.setrlimit(rl.RLIMIT_FSIZE, (fsize, fsize))
        rl.setrlimit(rl.RLIMIT_CORE, (0, 0))

    return apply


def tex_env(workdir: Path) -> dict[str, str]:
    """A minimal environment: nothing of the caller's TeX setup, kpathsea locked down."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "LC_ALL": "C",
        "openin_any": "p",
        "openout_any": "p",
        "shell_escape": "f",
        "MKTEXPK": "0",
        "MKTEXTFM": "0",
        "MKTEXMF": "0",
        "MKTEXTEX": "0",
        "MKTEXFMT": "0",
    }


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class _Watch:
    """What the terminal said so far."""

    current: int = -1  # formula TeX is on; -1: still in the preamble
    baseline: tuple[int, int] | None = None  # group and conditional depth between formulas
    errors: dict[int, str] = field(default_factory=dict)
    derailed: int | None = None
    reason: str | None = None
    finished: bool = False
    killed: bool = False


def _note_errors(watch: _Watch, text: str) -> None:
    if watch.current >= 0 and watch.current not in watch.errors:
        found = _ERROR_LINE.search(text)
        if found:
            watch.errors[watch.current] = found.group(0)[1:].strip()


def _note_marker(watch: _Watch, index: int, n: int, pages: int, levels: tuple[int, int]) -> bool:
    """Formula ``index`` starts (``n``: the end): the one before must have made exactly one
    page and, if a formula follows, left no group or conditional open. Returns False when
    markers come out of order (a formula re-reading the input): nothing after is trusted."""
    if index != watch.current + 1:
        if watch.derailed is None:
            watch.derailed, watch.reason = max(watch.current, 0), "re-read the TeX input"
        return False
    if watch.baseline is None:
        watch.baseline = levels
    if watch.derailed is None:
        if pages != index:
            watch.derailed, watch.reason = max(index - 1, 0), "did not produce exactly one page"
        elif index < n and levels != watch.baseline:
            watch.derailed, watch.reason = index - 1, "left a group or conditional open"
    watch.current, watch.finished = index, index == n
    return True


def _watch_tex(proc: subprocess.Popen, nonce: str, n: int, opts: RenderOptions) -> _Watch:
    """Follow TeX's markers live, giving each formula its own time limit.

    TeX is left to finish after a problem (the pages before it stay usable), but is killed
    when a formula or the whole run takes too long.
    """
    marker = marker_pattern(nonce)
    watch = _Watch()
    started = stage_start = time.monotonic()
    buf = ""  # terminal output since the last marker, bounded
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            limit = opts.formula_timeout_s if watch.current >= 0 else opts.timeout_s
            wait = min(stage_start + limit, started + opts.timeout_s) - now
            if wait <= 0:
                if watch.derailed is None:
                    watch.derailed = max(watch.current, 0)
                    watch.reason = f"timed out after {now - stage_start:.1f} s"
                _kill(proc)
                watch.killed = True
                return watch
            if not sel.select(timeout=wait):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk.decode("latin-1")
            pos = 0
            for m in marker.finditer(buf):
                _note_errors(watch, buf[pos : m.start()])
                index = n if m.group(1) == "end" else int(m.group(1))
                levels = (int(m.group(3)), int(m.group(4)))
                if not _note_marker(watch, index, n, int(m.group(2)), levels):
                    _kill(proc)
                    watch.killed = True
                    return watch
                stage_start, pos = time.monotonic(), m.end()
            buf = buf[pos:]
            if len(buf) > 20000:  # keep the error message and a marker split across reads
                buf = buf[:8000] + buf[-200:]
    proc.wait()
    if watch.current < 0:
        raise RenderError(f"pdflatex failed before the first formula:\n{buf[-2000:]}")
    if not watch.finished:
        _note_errors(watch, buf)
        if watch.derailed is None:
            watch.derailed = watch.current
            watch.reason = watch.errors.get(watch.current, "TeX stopped early")
    return watch


def run_tex(
    formulas: Sequence[str], geometry: Geometry, opts: RenderOptions, workdir: Path
) -> TexRun:
    """Compile one document in nonstop mode, TeX recovering from errors as it can."""
    nonce = secrets.token_hex(8)
    for old in workdir.iterdir():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    document = make_document(formulas, nonce, geometry, opts.dpi, get_style(opts.style))
    (workdir / "batch.tex").write_text(document)
    argv = ["pdflatex", "-no-shell-escape", "-interaction=nonstopmode", "-jobname=batch",
            "batch.tex"]
    proc = subprocess.Popen(
        sandboxed(argv, workdir, opts.sandbox),
        cwd=workdir, env=tex_env(workdir), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=limits(opts.memory_mb, opts.timeout_s),
    )
    try:
        watch = _watch_tex(proc, nonce, len(formulas), opts)
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close()
    if watch.derailed is not None:  # a hang after the last formula is blamed on it
        watch.derailed = min(watch.derailed, len(formulas) - 1)
    pdf = workdir / "batch.pdf"
    valid = len(formulas) if watch.derailed is None else watch.derailed
    if watch.killed or not pdf.exists():
        pdf, valid = None, 0
        if watch.derailed is None:
            watch.derailed, watch.reason = len(formulas) - 1, "no PDF produced"
    errors = {i: e for i, e in watch.errors.items() if i < valid}
    return TexRun(pdf, valid, errors, watch.derailed, watch.reason)
