"""The PDF of a TeX run to grey pages: Ghostscript, sandboxed and limited like TeX.

Ghostscript rasterizes at the render dpi (200 for the default style) with 4-bit text and
graphics anti-aliasing, which is what ImageMagick's ``convert -density 200`` asked of it when
IM2LATEX-100K was made.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np

from data.render_options import RenderError, RenderOptions
from data.sandbox import sandboxed
from data.tex_process import limits, tex_env

_PGM_HEADER = re.compile(rb"P5\s+(?:#[^\n]*\n\s*)*(\d+)\s+(\d+)\s+(\d+)\s")


def _split_pgm(data: bytes) -> list[np.ndarray]:
    """Ghostscript's pgmraw stream: one binary PGM per page, back to back."""
    pages, pos = [], 0
    while pos < len(data):
        m = _PGM_HEADER.match(data, pos)
        if m is None or int(m.group(3)) != 255:
            raise RenderError("unexpected output from Ghostscript")
        w, h = int(m.group(1)), int(m.group(2))
        pages.append(np.frombuffer(data, np.uint8, w * h, m.end()).reshape(h, w))
        pos = m.end() + w * h
    return pages


def rasterize(pdf: Path, pages: int, opts: RenderOptions) -> list[np.ndarray]:
    """The first pages of the PDF, anti-aliased as ImageMagick had Ghostscript do it.

    Ghostscript writes one file of back-to-back PGMs next to the PDF: reading it in one go
    costs far less than pulling ~0.5 MB a page through a pipe.
    """
    out = pdf.with_suffix(".pgm")
    a4_bytes = (210 / 25.4 * opts.dpi + 1) * (297 / 25.4 * opts.dpi + 1)
    file_mb = int(pages * a4_bytes / 2**20) + 16  # enough for full pages, nothing more
    cmd = [
        "gs", "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-dNOPROMPT",
        "-sDEVICE=pgmraw", f"-r{opts.dpi}", "-dTextAlphaBits=4", "-dGraphicsAlphaBits=4",
        f"-dLastPage={pages}", f"-sOutputFile={out.name}", pdf.name,
    ]
    try:
        done = subprocess.run(
            sandboxed(cmd, pdf.parent, opts.sandbox), cwd=pdf.parent, env=tex_env(pdf.parent),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=opts.timeout_s,
            start_new_session=True, preexec_fn=limits(opts.memory_mb, opts.timeout_s, file_mb),
        )
    except subprocess.TimeoutExpired:
        raise RenderError("Ghostscript timed out") from None
    if done.returncode != 0 or not out.exists():
        msg = (done.stdout + done.stderr).decode(errors="replace")[-500:]
        raise RenderError(f"Ghostscript failed (exit {done.returncode}): {msg}")
    return _split_pgm(out.read_bytes())
