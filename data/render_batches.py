"""A batch of formulas through TeX and Ghostscript to images, so that no formula's failure
touches another's image; and the work folders the batches run in.

Isolation: when a formula derails a TeX run (data.tex_process), the pages before it are kept
(compiled again only if pdfTeX kept no PDF), the culprit gets a run of its own, and a new run
starts after it; a formula whose ink touches the rasterized window's edge is rendered again on
the full page. So an image never depends on its batch-mates; a formula that could change
global state (``\\global``, counters, ``\\aftergroup``, ...) is put in a batch of its own.
Each batch runs in a fresh temporary directory named with the owner's PID: a later render
removes those of dead processes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.image import ImageError, finish_render, ink_bbox
from data.processes import process_alive
from data.rasterize import rasterize
from data.render_options import RenderError, RenderOptions, RenderResult
from data.styles import get_style
from data.tex_document import WINDOW, Geometry
from data.tex_process import TexRun, run_tex
from data.tex_screen import needs_isolation, screen


def _finish(page: np.ndarray, opts: RenderOptions) -> RenderResult:
    try:
        img = finish_render(page, opts.pad, opts.downsample, opts.bucket,
                            binary=get_style(opts.style).binary)
    except ImageError:
        return RenderResult(None, "rendered nothing visible")
    return RenderResult(img)


def _clipped(page: np.ndarray, geometry: Geometry) -> bool:
    """Ink on an edge of a window (not of the page itself) may continue outside it."""
    if geometry.height is None:
        return False
    box = ink_bbox(page)
    h, w = page.shape
    return box is not None and (box[0] == 0 or box[2] == 0 or box[1] == h or box[3] == w)


def _compile_pages(
    items: list[tuple[int, str]], geometry: Geometry, opts: RenderOptions, workdir: Path
) -> tuple[list[np.ndarray], TexRun]:
    """Pages for the leading formulas that TeX got through cleanly (all, if not derailed)."""
    run = run_tex([f for _, f in items], geometry, opts, workdir)
    if run.pdf is None or run.valid == 0:
        return [], run
    try:
        pages = rasterize(run.pdf, run.valid, opts)
    except RenderError as e:  # taken one formula at a time by the caller
        return [], TexRun(None, 0, reason=str(e))
    if len(pages) != run.valid:
        return [], TexRun(None, 0, reason=f"{len(pages)} pages for {run.valid} formulas")
    return pages, run


def _render_group(
    items: list[tuple[int, str]], geometry: Geometry, opts: RenderOptions, workdir: Path
) -> dict[int, RenderResult]:
    """Render a batch so that no formula's failure touches another's image."""
    out: dict[int, RenderResult] = {}
    refit: list[tuple[int, str]] = []  # clipped by the window: again on the full page
    queue = list(items)
    while queue:
        pages, run = _compile_pages(queue, geometry, opts, workdir)
        for j, ((index, formula), page) in enumerate(zip(queue, pages)):
            if opts.strict and j in run.errors:
                out[index] = RenderResult(None, run.errors[j])
            elif _clipped(page, geometry):
                refit.append((index, formula))
            else:
                out[index] = _finish(page, opts)
        if run.derailed is None:
            if not pages:  # pages and formulas disagree: trust nothing, one by one
                if len(queue) == 1:
                    out[queue[0][0]] = RenderResult(None, run.reason)
                else:
                    for item in queue:
                        out.update(_render_group([item], geometry, opts, workdir))
            break
        k = run.derailed
        if len(pages) < k:  # the run was killed or kept no PDF: the clean prefix again
            out.update(_render_group(queue[len(pages) : k], geometry, opts, workdir))
        index, formula = queue[k]
        out[index] = _render_alone(formula, run, geometry, opts, workdir)
        queue = queue[k + 1 :]
    if refit:
        out.update(_render_group(refit, Geometry(), opts, workdir))
    return out


def _render_alone(
    formula: str, failed: TexRun, geometry: Geometry, opts: RenderOptions, workdir: Path
) -> RenderResult:
    """The formula that derailed a run, in a run of its own: its own output or failure."""
    reason = failed.reason or "TeX error"
    if reason.startswith(("timed out", "did not produce", "re-read")):
        return RenderResult(None, reason)
    for geo in (geometry, Geometry()):
        pages, run = _compile_pages([(0, formula)], geo, opts, workdir)
        if not pages:
            return RenderResult(None, run.reason or reason)
        if opts.strict and run.errors:
            return RenderResult(None, run.errors[0])
        if not _clipped(pages[0], geo):
            return _finish(pages[0], opts)
    raise AssertionError("unreachable: the full page has no window edge")


WORKDIR_PREFIX = "im2latex-render-"
_WORKDIR = re.compile(rf"{WORKDIR_PREFIX}(\d+)-")


def render_batch(items: list[tuple[int, str]], opts: RenderOptions) -> dict[int, RenderResult]:
    """One worker's job: its own temporary directory, removed after, or by a later render
    when this process is killed first (the name holds the owner's PID)."""
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as tmp:
        window = Geometry(*(round(v * opts.dpi / 200) for v in WINDOW))
        return _render_group(items, window, opts, Path(tmp))


def split_batches(formulas: Sequence[str], opts: RenderOptions):
    """Screen every formula; group the rest into batches, isolating global assignments."""
    rejected: dict[int, RenderResult] = {}
    batches: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    size = max(1, min(opts.batch_size, -(-len(formulas) // max(1, opts.workers))))  # fill cores
    for i, f in enumerate(formulas):
        reason = screen(f, opts.max_chars)
        if reason is not None:
            rejected[i] = RenderResult(None, reason)
        elif needs_isolation(f):
            batches.append([(i, f)])
        else:
            current.append((i, f))
            if len(current) >= size:
                batches.append(current)
                current = []
    if current:
        batches.append(current)
    return rejected, batches


def remove_stale_workdirs() -> list[Path]:
    """Remove the work folders of renders whose process no longer exists (killed builds);
    those of live processes, and folders of other users, stay. Returns what was removed."""
    removed = []
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{WORKDIR_PREFIX}*"):
        m = _WORKDIR.match(path.name)
        try:
            mine = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if m and mine and not process_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
