"""The lasting failures of a render folder, remembered so that a rerun does not render them again.

Why: ``data.render.render_to_dir`` resumes by keeping the PNGs already on disk, but a formula
that failed leaves none, so every rerun rendered all the failures again: after one restart of
issue 13's full build, the ``cm`` pass spent 15 minutes re-failing 61,559 formulas. A failure
the same input always repeats is written down beside the images, and a rerun reports it failed
again, with the same reason, without TeX (so a build's report and drop counts are unchanged).

What is remembered: TeX's own verdicts on a formula (its first error line, not exactly one
page, a group left open, a blank page). Never what a busy machine or a limit may have caused
(a timeout, a TeX or Ghostscript run killed or starved of memory, TeX's capacity), which may
pass next time; nor the screen's refusals, which cost nothing to repeat. ``is_lasting`` decides.

Where and keyed how: ``OUT_DIR/.failed/FINGERPRINT.jsonl``. The fingerprint covers every render
option that can change an outcome (``effective_options``: dpi, pad, bucket, strict, the TeX
limits, the style in full with any extra packages) and the TeX installation (pdflatex's version
line), but not how the work is spread (workers, batch size: an image never depends on its
batch-mates, data.render_batches); each record also holds a digest of the formula's text. So a
record is only ever reused for the same input rendered the same way. The first line describes
the options (for people); then one ``{"name", "formula", "error"}`` record a line.

Why appended lines rather than a file written atomically per chunk: one ``render_to_dir`` call
is one pass of hours with no chunks, its failures arrive one by one in no order, and rewriting
a growing file after each would cost quadratic time. A line is flushed as soon as its failure is
known, so a killed run loses at most the line it was writing; a torn or unreadable line is
skipped, and opening the file rewrites it atomically without such lines. One writer a folder at
a time (as for the images). A changed renderer (not its options) is not seen: rerun with
``retry_failed`` (``preprocess.py --retry_failed``) or delete the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import TextIO

from data.files import atomic_write, remove_stale_temps
from data.render_options import RenderOptions, effective_options
from data.styles import get_style
from data.tex_screen import screen

FOLDER = ".failed"
FORMAT = 1  # bump when what a record means changes: older records are then left unread
# Options that only spread the work: an image never depends on its batch-mates.
_NO_EFFECT = frozenset({"workers", "batch_size"})
# Reasons a quieter machine, more memory or another run may not repeat (data.tex_process,
# data.render_batches, data.rasterize): the failure is not remembered.
_PASSING = re.compile(
    r"^(timed out|TeX stopped early|no PDF produced|TeX error$|failed$|not rendered"
    r"|\d+ pages for \d+ formulas|Interruption)|Ghostscript|capacity exceeded|memory",
    re.IGNORECASE)


def is_lasting(formula: str, error: str | None, opts: RenderOptions) -> bool:
    """Whether rendering ``formula`` again with ``opts`` is bound to fail the same way."""
    return bool(error) and screen(formula, opts.max_chars) is None and not _PASSING.search(error)


@functools.cache
def tex_version() -> str:
    """pdflatex's version line: another TeX installation may typeset what this one refused."""
    try:
        done = subprocess.run(["pdflatex", "--version"], capture_output=True, text=True,
                              timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                               "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (done.stdout.splitlines() or ["unknown"])[0]


def describe(opts: RenderOptions) -> dict:
    """What the fingerprint covers, as plain JSON values."""
    opts = effective_options(opts)
    options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
               if f.name not in _NO_EFFECT}
    options["style"] = dataclasses.asdict(get_style(opts.style))
    return {"format": FORMAT, "options": options, "tex": tex_version()}


def fingerprint(opts: RenderOptions) -> str:
    text = json.dumps(describe(opts), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def formula_digest(formula: str) -> str:
    return hashlib.sha256(formula.encode("utf-8")).hexdigest()[:32]


class FailedRenders:
    """The lasting failures recorded in ``out_dir`` for ``opts``; ``forget``: names whose
    records are dropped (they are to be rendered again). Use as a context manager."""

    def __init__(self, out_dir: Path, opts: RenderOptions, forget: Collection[str] = ()):
        self.opts = opts
        self.path = Path(out_dir) / FOLDER / f"{fingerprint(opts)}.jsonl"
        self.records: dict[str, tuple[str, str]] = {}  # name -> (formula digest, error)
        self._file: TextIO | None = None
        if self.path.parent.is_dir():
            remove_stale_temps(self.path.parent)
        if self.path.is_file():
            self._load(set(forget))

    def _load(self, forget: set[str]) -> None:
        """Read the records; rewrite the file when a line was torn, unreadable or forgotten."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                name, digest, error = rec["name"], rec["formula"], rec["error"]
            except (ValueError, TypeError, KeyError):
                continue
            if name not in forget and all(isinstance(v, str) for v in (name, digest, error)):
                self.records[name] = (digest, error)
        if len(lines) - 1 != len(self.records) or not text.endswith("\n"):
            atomic_write(self.path, "".join(self._line(name) for name in [None, *self.records]))

    def _line(self, name: str | None) -> str:
        """The header line (name None) or the record of ``name``, newline-terminated."""
        if name is None:
            return json.dumps(describe(self.opts), sort_keys=True) + "\n"
        digest, error = self.records[name]
        return json.dumps({"name": name, "formula": digest, "error": error}) + "\n"

    def get(self, name: str, formula: str) -> str | None:
        """The recorded reason ``formula``, imaged as ``name``, failed; None if not recorded."""
        rec = self.records.get(name)
        return rec[1] if rec is not None and rec[0] == formula_digest(formula) else None

    def add(self, name: str, formula: str, error: str | None) -> None:
        """Record the failure if it is lasting: appended and flushed at once."""
        if not is_lasting(formula, error, self.opts):
            return
        if self._file is None:
            new = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            if new:
                self._file.write(self._line(None))
        self.records[name] = (formula_digest(formula), error)
        self._file.write(self._line(name))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FailedRenders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
