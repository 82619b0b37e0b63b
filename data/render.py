"""Render LaTeX formulas to images that look like IM2LATEX-100K's, many per TeX run, sandboxed.

How (and why): each formula goes on its own page of one pdflatex document, exactly as the
original pipeline typeset it alone; Ghostscript rasterizes a window of the PDF at 200 dpi
anti-aliased as ImageMagick had it do; then ``data.image.finish_render`` binarizes, crops,
pads, buckets and halves. latex+dvipng is faster but its glyphs differ visibly from the
dataset's. This module is the public face (options, results, ``render_formulas``,
``iter_render``, ``render_to_dir``); the stages live in modules of their own, each saying why:

- data.tex_screen: the lexical screen and the formula text as it goes into the document;
- data.tex_document: the batch document, its markers and the rasterized window;
- data.tex_process: one sandboxed, limited pdflatex run, watched formula by formula;
- data.rasterize: the PDF to pages with Ghostscript, sandboxed alike;
- data.render_batches: a batch to images, a derailing formula isolated, and the work folders;
- data.render_options: the options and results they share;
- data.failed_renders: the lasting failures ``render_to_dir`` remembers, so reruns skip them.

Errors: with ``strict=False`` (default) a formula whose only problems are TeX errors that
TeX recovers from is rendered as the original dataset was (``pdflatex -interaction=
nonstopmode``: e.g. ``\\hspace{2 c m}`` gives "pt inserted" and still renders); with
``strict=True`` any TeX error fails the formula. Fatal errors, timeouts, blank output and
anything but exactly one page fail it in both modes.

Sandbox: formulas are untrusted. The screen (defence in depth) refuses what could reach files
or the engine; pdflatex and Ghostscript run under bubblewrap with kpathsea locked down,
rlimits and time limits (data.tex_process says exactly how).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from data.failed_renders import FailedRenders
from data.files import atomic_open, remove_stale_temps
from data.render_batches import (
    WORKDIR_PREFIX,
    remove_stale_workdirs,
    render_batch,
    split_batches,
)
from data.render_options import (
    RenderError,
    RenderOptions,
    RenderResult,
    effective_options,
)
from data.styles import DEFAULT_STYLE, Style, get_style
from data.tex_screen import ENVIRONMENTS, needs_isolation, screen, tex_body, wrap_multiline

__all__ = [
    "ENVIRONMENTS", "PREAMBLE", "WORKDIR_PREFIX", "RenderError", "RenderOptions", "RenderReport",
    "RenderResult", "check_tools", "effective_options", "iter_render", "needs_isolation",
    "remove_stale_workdirs", "render_formulas", "render_results", "render_to_dir", "screen",
    "tex_body", "wrap_multiline",
]

PREAMBLE = get_style(DEFAULT_STYLE).preamble()
# The options a call without any gets: one frozen instance, made once.
_DEFAULT = RenderOptions()


@dataclass
class RenderReport:
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    failed_names: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    remembered: int = 0  # of the failed: recorded by an earlier run, not rendered again

    def fail(self, name: str, error: str) -> None:
        self.failed += 1
        self.failed_names.append(name)
        self.errors[name] = error


def check_tools() -> None:
    """Fail early and clearly when the TeX or Ghostscript programs are missing."""
    missing = [t for t in ("pdflatex", "gs") if shutil.which(t) is None]
    if missing:
        raise RenderError(f"missing programs: {', '.join(missing)} (apt-get install "
                          "texlive-latex-base texlive-latex-recommended ghostscript)")


def iter_render(
    formulas: Sequence[str], opts: RenderOptions = _DEFAULT, progress: bool = False
) -> Iterator[tuple[int, RenderResult]]:
    """(index, result) pairs as batches finish, in no particular order; all cores busy."""
    check_tools()
    remove_stale_workdirs()
    opts = effective_options(opts)
    rejected, batches = split_batches(formulas, opts)
    yield from rejected.items()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(formulas), initial=len(rejected), unit="formula", smoothing=0.05)
    try:
        with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
            futures = [pool.submit(render_batch, b, opts) for b in batches]
            try:
                for fut in as_completed(futures):
                    done = fut.result()
                    if bar is not None:
                        bar.update(len(done))
                    yield from done.items()
            finally:
                for fut in futures:
                    fut.cancel()
    finally:
        if bar is not None:
            bar.close()


def render_results(
    formulas: Sequence[str], opts: RenderOptions = _DEFAULT, progress: bool = False
) -> list[RenderResult]:
    """Like render_formulas, with the reason for each failure."""
    results: list[RenderResult] = [RenderResult(None, "not rendered")] * len(formulas)
    for i, r in iter_render(formulas, opts, progress):
        results[i] = r
    return results


def render_formulas(
    formulas: Sequence[str], opts: RenderOptions = _DEFAULT, progress: bool = False,
    style: str | Style | None = None,
) -> list[np.ndarray | None]:
    """Images in input order; None where a formula failed to render. ``style`` (a name in
    data.styles.STYLES) overrides ``opts.style``: the same formulas in another look."""
    if style is not None:
        opts = replace(opts, style=style)
    return [r.image for r in render_results(formulas, opts, progress)]


def _write_png(img: np.ndarray, path: Path) -> None:
    """Temp file + rename: a killed run never leaves a half-written PNG behind. Not fsynced
    (data.files.atomic_open: it would cost about as much as the render); only a power cut may
    leave an empty PNG, which sharding reports as unreadable."""
    with atomic_open(path, sync=False) as fh:
        Image.fromarray(img).save(fh, format="PNG")


def render_to_dir(
    formulas: Sequence[str], names: Sequence[str], out_dir: Path,
    opts: RenderOptions = _DEFAULT, progress: bool = True, retry_failed: bool = False,
) -> RenderReport:
    """Write ``out_dir/NAME.png`` for each formula; PNGs already there are kept (resumable),
    the half-written ones of a killed run removed. A lasting failure (a TeX error, not a
    timeout) is recorded in ``out_dir/.failed/`` (data.failed_renders), and a rerun with the
    same options reports it failed again, with its reason, without rendering it: reruns cost
    what the new formulas cost. ``retry_failed``: render those again (their records go)."""
    if len(formulas) != len(names):
        raise ValueError("formulas and names differ in length")
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"bad image name: {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    report = RenderReport()
    with FailedRenders(out_dir, opts, forget=set(names) if retry_failed else ()) as records:
        todo_idx = []
        for i, name in enumerate(names):
            if (out_dir / f"{name}.png").exists():
                report.skipped += 1
            elif (error := records.get(name, formulas[i])) is not None:
                report.fail(name, error)
                report.remembered += 1
            else:
                todo_idx.append(i)
        if progress and report.remembered:
            print(f"{report.remembered} formulas failed for good (a TeX error) in an earlier "
                  f"run: reported failed, not rendered again ({records.path}; "
                  "preprocess.py --retry_failed renders them)", file=sys.stderr)
        for j, result in iter_render([formulas[i] for i in todo_idx], opts, progress):
            i = todo_idx[j]
            if result.image is None:
                report.fail(names[i], result.error or "failed")
                records.add(names[i], formulas[i], result.error)
            else:
                _write_png(result.image, out_dir / f"{names[i]}.png")
                report.rendered += 1
    report.failed_names.sort()
    return report
