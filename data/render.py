"""Render LaTeX formulas to images that look like IM2LATEX-100K's, many per TeX run, sandboxed.

How (and why): each formula goes on its own page of one pdflatex document, exactly as the
original pipeline typeset it alone (``article`` 12pt, ``\\pagestyle{empty}``, amsmath,
``displaymath``, A4 PDF media); Ghostscript rasterizes the PDF at 200 dpi with 4-bit text and
graphics anti-aliasing (what ImageMagick's ``convert -density 200`` asks of it); then
``data.image.finish_render`` binarizes, crops, pads, buckets and halves. Fidelity depends on the
glyphs' sub-pixel phase, so the page layout is kept and only a window of the page is
rasterized (pdfTeX's origin shifted by whole pixels), which is pixel-identical to the full page
and ~5x cheaper; a formula whose ink touches the window's edge is rendered again on the full
page. latex+dvipng is faster but its glyphs differ visibly from the dataset's.

Isolation: before each formula TeX prints a marker with its page count, group depth and
conditional depth (``\\message`` flushes the terminal, so markers are read live, which also
gives every formula its own time limit). A formula "derails" the run when the next marker
shows other than one new page, an open group or conditional, or comes out of order, or when
it times out; pages before it are kept (compiled again only if pdfTeX kept no PDF), the
culprit gets a run of its own, and a new run starts after it. A TeX error that leaves the
state clean does not derail. So an image never depends on its batch-mates; a formula that
could change global state (``\\global``, counters, ``\\aftergroup``, ...) runs alone.

Styles: ``RenderOptions(style=NAME)`` (``data.styles.STYLES``) swaps the preamble's font
packages and size, text or display style, the rasterization dpi and binarized or anti-aliased
output; one TeX document holds one style. The default, ``cm``, is the look described above.

Errors: with ``strict=False`` (default) a formula whose only problems are TeX errors that
TeX recovers from is rendered as the original dataset was (``pdflatex -interaction=
nonstopmode``: e.g. ``\\hspace{2 c m}`` gives "pt inserted" and still renders); with
``strict=True`` any TeX error fails the formula. Fatal errors, timeouts, blank output and
anything but exactly one page fail it in both modes.

Multi-line bodies: a formula with ``\\\\`` or ``&`` outside any group or environment (an align
or eqnarray body) is wrapped in ``aligned`` (if it has ``&``) or ``gathered``; IM2LATEX
formulas never have them at top level (their rows live in ``array``), so they are unaffected.

Sandbox: formulas are untrusted. pdflatex and Ghostscript run under bubblewrap
(``data.sandbox``: fresh namespaces, no network, only the TeX tree, Ghostscript's resources and
the work directory visible; where it cannot start, a warning, once). Inside, TeX runs in a fresh
temporary directory (named with the owner's PID: a later render removes those of dead
processes) with kpathsea's ``openin_any=p`` / ``openout_any=p``, ``shell_escape=f`` and
``-no-shell-escape``, no font generation, a minimal environment, and rlimits on address space,
CPU time, file size and core dumps; a run is killed when one formula takes longer than
``formula_timeout_s`` or the run longer than ``timeout_s``. Every formula starts with the
counters of a fresh document. Before that, a lexical screen (defence in depth, not the
boundary) rejects file and engine primitives (``\\input``, ``\\openin``, ``\\csname``,
``\\string``, ``\\IfFileExists``, ``\\pdf...``, ``^^`` escapes, ...), ways to take a command
apart from its argument (``\\let``, ``\\expandafter``, ``\\aftergroup``, ``#``),
environments outside an allow-list (``\\begin{input}`` runs ``\\input``) and over-long
formulas; raw ``~`` and ``$`` are rewritten (``\\nobreakspace{}``, ``\\(..\\)``), so no
formula spells the catcode-12 ``~`` or ``$`` of kpathsea's ``~user/`` and ``$VAR/``.
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
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from data.image import ImageError, finish_render, ink_bbox
from data.processes import process_alive
from data.sandbox import sandboxed
from data.styles import DEFAULT_STYLE, Style, get_style

PREAMBLE = get_style(DEFAULT_STYLE).preamble()

# The dataset's glyphs sit this far (in bp) below where this TeX Live puts them on A4: found
# by scanning sub-pixel offsets against the sample; it halves the pixel error on
# well-matched images.
_VERTICAL_PHASE_BP = 0.06
_HORIZONTAL_PHASE_BP = 0.0

# The rasterized window, in pixels at 200 dpi: columns 330..1430, rows 360..760 of the A4
# page. On 1000 test formulas the ink spanned columns 355..1339 and rows 382..668.
_WINDOW = (330, 360, 1100, 400)  # left, top, width, height

# Anything that touches files, the engine or the tokenizer, spells a name or a file name
# from tokens (``\\string~`` makes the catcode-12 ``~`` that kpathsea expands to a home
# directory; ``\\pagenumbering{@@input}`` makes ``\\thepage`` run ``\\@@input``), copies
# or moves a token away from what follows it (``\\let\\b\\begin``, then ``\\b{input}``),
# or sets hooks; no formula needs these.
_FORBIDDEN = re.compile(
    r"\\(input|include|includeonly|openin|openout|closein|closeout|read|readline|write|"
    r"immediate|csname|ifcsname|catcode|lccode|uccode|sfcode|mathcode|delcode|scantokens|"
    r"endinput|jobname|shipout|output|everyjob|everyeof|primitive|pdf[a-z]*|directlua|"
    r"latelua|usepackage|RequirePackage|documentclass|LoadClass|dump|batchmode|nonstopmode|"
    r"scrollmode|errorstopmode|interactionmode|string|detokenize|unexpanded|meaning|"
    r"fontname|font|newfont|fontencoding|fontfamily|usefont|Declare[A-Za-z]*|"
    r"makeatletter|ExplSyntaxOn|UseName|ExpandArgs|[A-Za-z]*CommandCopy|IfFileExists|"
    r"InputIfFileExists|listfiles|nofiles|verbatiminput|lstinputlisting|special|let|"
    r"futurelet|expandafter|aftergroup|afterassignment|AddToHook[A-Za-z]*|UseHook|"
    r"AtBeginDocument|AtEndDocument|AtBeginDvi|tableofcontents|listof[a-z]*|"
    r"addtocontents|addcontentsline|newwrite|newread|bibliography[a-z]*|pagenumbering|"
    r"pagestyle|thispagestyle|numberwithin|newtheorem)(?![a-zA-Z])"
    r"|\\@(?=[a-zA-Z])|\^\^"
)
# Environments that formulas use and the preamble's packages define. LaTeX runs ``\\NAME``
# for ``\\begin{NAME}`` and ``\\endNAME`` for ``\\end{NAME}``: any other name could run a
# primitive the screen refuses by name (``\\begin{input}``, ``\\end{csname}``).
ENVIRONMENTS = frozenset({
    "array", "tabular", "matrix", "pmatrix", "bmatrix", "Bmatrix", "vmatrix", "Vmatrix",
    "smallmatrix", "cases", "aligned", "alignedat", "gathered", "split", "subarray", "picture",
})
_ENVIRONMENT = re.compile(r"\\(?:begin|end)(?![a-zA-Z])(?:\s*\{([a-zA-Z]+)\})?")
# One TeX token as the default catcodes read it (a comment runs to the end of its line).
_TOKEN = re.compile(r"\\(?:[a-zA-Z]+|.)|%[^\n]*|.", re.S)
# Global assignments would leak into later formulas of a batch: render those alone.
_GLOBAL = re.compile(
    r"\\(global|gdef|xdef|globaldefs|setcounter|addtocounter|stepcounter|refstepcounter|"
    r"newcounter|aftergroup|afterassignment|fontdimen|hyphenchar|skewchar|deadcycles|"
    r"insertpenalties|prevgraf|interactionmode)(?![a-zA-Z])"
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ERROR_LINE = re.compile(r"^!.*$", re.M)  # "! Undefined ...", "!pdfTeX error: ..."


class RenderError(RuntimeError):
    """The TeX installation itself is unusable (missing program, broken preamble)."""


@dataclass(frozen=True)
class RenderOptions:
    """How to render; the defaults reproduce IM2LATEX-100K's images."""

    dpi: int = 200
    pad: int = 8  # pixels around the ink, at render resolution
    downsample: int = 2
    bucket: bool = False  # paste into the smallest data.image.BUCKETS size
    batch_size: int = 200  # formulas per TeX run (fewer when that would idle a worker)
    timeout_s: float = 120.0  # one TeX or Ghostscript run
    formula_timeout_s: float = 3.0  # TeX busy with one formula
    memory_mb: int = 1024  # address space of each TeX / Ghostscript process
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    strict: bool = False  # True: any TeX error fails the formula
    max_chars: int = 4096
    sandbox: bool = True  # run TeX and Ghostscript under bubblewrap where it can start
    style: str | Style = DEFAULT_STYLE  # a name in data.styles.STYLES (fonts, size, look)

    def __post_init__(self) -> None:
        get_style(self.style)  # an unknown name fails here, listing the valid ones


def _effective(opts: RenderOptions) -> RenderOptions:
    """The options a style's resolution implies: rasterized at its dpi, shrunk by the
    integer factor that lands at the usual output scale, margins scaled alike."""
    style = get_style(opts.style)
    if style.dpi is None or style.dpi == opts.dpi:
        return opts
    factor, rest = divmod(opts.downsample * style.dpi, opts.dpi)
    if rest or factor < 1:
        raise ValueError(f"style {style.name!r}: {style.dpi} dpi is no integer multiple of "
                         f"the output scale ({opts.dpi} dpi / {opts.downsample})")
    return replace(opts, dpi=style.dpi, downsample=factor,
                   pad=round(opts.pad * style.dpi / opts.dpi))


@dataclass(frozen=True)
class RenderResult:
    """An image, or the reason there is none."""

    image: np.ndarray | None
    error: str | None = None


@dataclass
class RenderReport:
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    failed_names: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Geometry:
    """Which part of the A4 page to rasterize, in pixels; no size means the whole page."""

    left: int = 0
    top: int = 0
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class _TexRun:
    """One pdflatex run. Pages ``0..valid-1`` of ``pdf`` are trustworthy; ``errors`` holds the
    (recovered) TeX error of formulas among them; ``derailed`` is the formula after which
    TeX's state was no longer clean (None: the run went through)."""

    pdf: Path | None
    valid: int
    errors: dict[int, str] = field(default_factory=dict)
    derailed: int | None = None
    reason: str | None = None


# ------------------------------------------------------------------------ formula text


def screen(formula: str, max_chars: int = 4096) -> str | None:
    """Why a formula must not reach TeX, or None; cheap and conservative."""
    if not formula.strip():
        return "empty formula"
    if len(formula) > max_chars:
        return f"formula longer than {max_chars} characters"
    if _CONTROL_CHARS.search(formula):
        return "formula contains control characters"
    m = _FORBIDDEN.search(formula)
    if m:
        return f"forbidden in a formula: {m.group(0)}"
    for m in _ENVIRONMENT.finditer(formula):
        if m.group(1) not in ENVIRONMENTS:
            return f"environment not allowed: {m.group(0)}"
    return _screen_characters(formula)


def _screen_characters(formula: str) -> str | None:
    """Raw ``#`` (a macro parameter: lets a macro take ``\\begin`` apart from its name) and
    ``$`` that cannot become ``\\(...\\)`` pairs."""
    dollars, previous = 0, ""
    for token in _TOKEN.findall(formula):
        if token == "#":
            return "forbidden in a formula: # (macro parameter)"
        if token == "$":
            if previous == "$":
                return "forbidden in a formula: $$"
            dollars += 1
        previous = token
    return "unpaired $ in a formula" if dollars % 2 else None


def tex_body(formula: str) -> str:
    """The formula as it goes into the document: no raw ``~`` or ``$`` reach TeX.

    ``~`` is ``\\nobreakspace{}`` in LaTeX and ``$..$`` pairs are ``\\(..\\)`` (the same
    image), so no character of the formula can become the catcode-12 ``~`` or ``$`` with which
    kpathsea expands ``~user/`` and ``$VAR/`` in a file name. Call after ``screen``.
    """
    out, dollars = [], 0
    for token in _TOKEN.findall(formula):
        if token == "~":
            token = "\\nobreakspace{}"
        elif token == "$":
            token = "\\(" if dollars % 2 == 0 else "\\)"
            dollars += 1
        out.append(token)
    return "".join(out)


def needs_isolation(formula: str) -> bool:
    """Global assignments survive the page; such a formula gets a TeX run of its own."""
    return _GLOBAL.search(formula) is not None


def _top_level_marks(formula: str) -> set[str]:
    """Which of ``\\\\`` and ``&`` occur outside braces and environments."""
    found: set[str] = set()
    depth = 0
    i = 0
    while i < len(formula):
        c = formula[i]
        if c == "\\":
            m = re.match(r"\\([a-zA-Z]+|.)", formula[i:], re.S)
            name = m.group(1) if m else ""
            if name == "begin":
                depth += 1
            elif name == "end":
                depth -= 1
            elif name == "\\" and depth == 0:
                found.add("\\\\")
            i += len(m.group(0)) if m else 1
            continue
        if c == "%":  # a comment runs to the end of the line
            nl = formula.find("\n", i)
            i = len(formula) if nl < 0 else nl
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "&" and depth == 0:
            found.add("&")
        i += 1
    return found


def wrap_multiline(formula: str) -> str:
    """Give an align/eqnarray body the alignment it needs; leave every other formula as is."""
    marks = _top_level_marks(formula)
    if not marks:
        return formula
    env = "aligned" if "&" in marks else "gathered"
    return f"\\begin{{{env}}}\n{formula}\n\\end{{{env}}}"


def _document(
    formulas: Sequence[str], nonce: str, geometry: _Geometry, dpi: int, style: Style
) -> str:
    """One page per formula; markers tell which formula TeX is on and how many pages exist."""
    px = 72.0 / dpi  # one pixel in bp
    setup = [
        f"\\pdfhorigin=\\dimexpr1truein+{_HORIZONTAL_PHASE_BP}bp-{geometry.left * px:.5f}bp\\relax",
        f"\\pdfvorigin=\\dimexpr1truein+{_VERTICAL_PHASE_BP}bp-{geometry.top * px:.5f}bp\\relax",
        f"\\pdfpagewidth=\\dimexpr210truemm-{geometry.left * px:.5f}bp\\relax",
        "\\pdfpageheight=297truemm",
    ]
    if geometry.width is not None:
        setup[2] = f"\\pdfpagewidth={geometry.width * px:.5f}bp"
    if geometry.height is not None:
        # Rows are counted from the top, but Ghostscript sizes the page from its (fractional)
        # height: cut whole rows off the A4 height so every glyph keeps its sub-pixel phase.
        cut = round(297 / 25.4 * dpi) - geometry.height
        setup[3] = f"\\pdfpageheight=\\dimexpr297truemm-{cut * px:.5f}bp\\relax"
    parts = [style.preamble(), "\n".join(setup), _PAGE_STATE, "\\begin{document}\n"]
    # Text style stays in a display (centred, never broken across lines), only smaller.
    lead = "" if style.display else "\\textstyle "
    for i, f in enumerate(formulas):
        parts.append(
            _marker(nonce, str(i))
            + f"\\csname imx@reset\\endcsname\n{style.setup}\\begin{{displaymath}}\n"
            + f"{lead}{wrap_multiline(tex_body(f))}\n\\end{{displaymath}}\n\\newpage\n"
        )
    parts.append(_marker(nonce, "end") + "\\end{document}\n")
    return "".join(parts)


# Every formula starts with the counters of a fresh document (``\\thepage``, ``\\footnotemark``
# must not depend on batch-mates); pages are counted in a register of the document's own,
# which no formula can name (``@`` is no letter in a formula), for the markers.
_PAGE_STATE = r"""
\makeatletter
\newcount\imx@pages
\AddToHook{shipout/after}{\global\advance\imx@pages\@ne}
\def\imx@reset{\begingroup\def\@elt##1{\global\csname c@##1\endcsname\z@}\cl@@ckpt
  \endgroup\global\c@page\@ne}
\makeatother
"""


def _marker(nonce: str, label: str) -> str:
    """TeX prints where it is and its state: pages shipped, group and conditional depth."""
    state = "\\the\\csname imx@pages\\endcsname:\\the\\currentgrouplevel:\\the\\currentiflevel"
    return f"\\message{{@@{nonce}:{label}:{state}@@}}\n"


# --------------------------------------------------------------------------- processes


def _limits(memory_mb: int, cpu_s: float, file_mb: int = 256):
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


def _tex_env(workdir: Path) -> dict[str, str]:
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
    marker = re.compile(rf"@@{nonce}:(\d+|end):(\d+):(\d+):(\d+)@@")
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


def _run_tex(
    formulas: Sequence[str], geometry: _Geometry, opts: RenderOptions, workdir: Path
) -> _TexRun:
    """Compile one document in nonstop mode, TeX recovering from errors as it can."""
    nonce = secrets.token_hex(8)
    for old in workdir.iterdir():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    document = _document(formulas, nonce, geometry, opts.dpi, get_style(opts.style))
    (workdir / "batch.tex").write_text(document)
    argv = ["pdflatex", "-no-shell-escape", "-interaction=nonstopmode", "-jobname=batch",
            "batch.tex"]
    proc = subprocess.Popen(
        sandboxed(argv, workdir, opts.sandbox),
        cwd=workdir, env=_tex_env(workdir), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_limits(opts.memory_mb, opts.timeout_s),
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
    return _TexRun(pdf, valid, errors, watch.derailed, watch.reason)


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


def _rasterize(pdf: Path, pages: int, opts: RenderOptions) -> list[np.ndarray]:
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
            sandboxed(cmd, pdf.parent, opts.sandbox), cwd=pdf.parent, env=_tex_env(pdf.parent),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=opts.timeout_s,
            start_new_session=True, preexec_fn=_limits(opts.memory_mb, opts.timeout_s, file_mb),
        )
    except subprocess.TimeoutExpired:
        raise RenderError("Ghostscript timed out") from None
    if done.returncode != 0 or not out.exists():
        msg = (done.stdout + done.stderr).decode(errors="replace")[-500:]
        raise RenderError(f"Ghostscript failed (exit {done.returncode}): {msg}")
    return _split_pgm(out.read_bytes())


# ------------------------------------------------------------------------------ batches


def _finish(page: np.ndarray, opts: RenderOptions) -> RenderResult:
    try:
        img = finish_render(page, opts.pad, opts.downsample, opts.bucket,
                            binary=get_style(opts.style).binary)
    except ImageError:
        return RenderResult(None, "rendered nothing visible")
    return RenderResult(img)


def _clipped(page: np.ndarray, geometry: _Geometry) -> bool:
    """Ink on an edge of a window (not of the page itself) may continue outside it."""
    if geometry.height is None:
        return False
    box = ink_bbox(page)
    h, w = page.shape
    return box is not None and (box[0] == 0 or box[2] == 0 or box[1] == h or box[3] == w)


def _compile_pages(
    items: list[tuple[int, str]], geometry: _Geometry, opts: RenderOptions, workdir: Path
) -> tuple[list[np.ndarray], _TexRun]:
    """Pages for the leading formulas that TeX got through cleanly (all, if not derailed)."""
    run = _run_tex([f for _, f in items], geometry, opts, workdir)
    if run.pdf is None or run.valid == 0:
        return [], run
    try:
        pages = _rasterize(run.pdf, run.valid, opts)
    except RenderError as e:  # taken one formula at a time by the caller
        return [], _TexRun(None, 0, reason=str(e))
    if len(pages) != run.valid:
        return [], _TexRun(None, 0, reason=f"{len(pages)} pages for {run.valid} formulas")
    return pages, run


def _render_group(
    items: list[tuple[int, str]], geometry: _Geometry, opts: RenderOptions, workdir: Path
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
        out.update(_render_group(refit, _Geometry(), opts, workdir))
    return out


def _render_alone(
    formula: str, failed: _TexRun, geometry: _Geometry, opts: RenderOptions, workdir: Path
) -> RenderResult:
    """The formula that derailed a run, in a run of its own: its own output or failure."""
    reason = failed.reason or "TeX error"
    if reason.startswith(("timed out", "did not produce", "re-read")):
        return RenderResult(None, reason)
    for geo in (geometry, _Geometry()):
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


def _render_batch(items: list[tuple[int, str]], opts: RenderOptions) -> dict[int, RenderResult]:
    """One worker's job: its own temporary directory, removed after, or by a later render
    when this process is killed first (the name holds the owner's PID)."""
    with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as tmp:
        window = _Geometry(*(round(v * opts.dpi / 200) for v in _WINDOW))
        return _render_group(items, window, opts, Path(tmp))


def _batches(formulas: Sequence[str], opts: RenderOptions):
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


def check_tools() -> None:
    """Fail early and clearly when the TeX or Ghostscript programs are missing."""
    missing = [t for t in ("pdflatex", "gs") if shutil.which(t) is None]
    if missing:
        raise RenderError(f"missing programs: {', '.join(missing)} (apt-get install "
                          "texlive-latex-base texlive-latex-recommended ghostscript)")


def iter_render(
    formulas: Sequence[str], opts: RenderOptions = RenderOptions(), progress: bool = False
) -> Iterator[tuple[int, RenderResult]]:
    """(index, result) pairs as batches finish, in no particular order; all cores busy."""
    check_tools()
    remove_stale_workdirs()
    opts = _effective(opts)
    rejected, batches = _batches(formulas, opts)
    yield from rejected.items()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(formulas), initial=len(rejected), unit="formula", smoothing=0.05)
    try:
        with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
            futures = [pool.submit(_render_batch, b, opts) for b in batches]
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
    formulas: Sequence[str], opts: RenderOptions = RenderOptions(), progress: bool = False
) -> list[RenderResult]:
    """Like render_formulas, with the reason for each failure."""
    results: list[RenderResult] = [RenderResult(None, "not rendered")] * len(formulas)
    for i, r in iter_render(formulas, opts, progress):
        results[i] = r
    return results


def render_formulas(
    formulas: Sequence[str], opts: RenderOptions = RenderOptions(), progress: bool = False,
    style: str | Style | None = None,
) -> list[np.ndarray | None]:
    """Images in input order; None where a formula failed to render. ``style`` (a name in
    data.styles.STYLES) overrides ``opts.style``: the same formulas in another look."""
    if style is not None:
        opts = replace(opts, style=style)
    return [r.image for r in render_results(formulas, opts, progress)]


def _write_png(img: np.ndarray, path: Path) -> None:
    """Temp file + rename: a killed run never leaves a half-written PNG behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(img).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_to_dir(
    formulas: Sequence[str], names: Sequence[str], out_dir: Path,
    opts: RenderOptions = RenderOptions(), progress: bool = True,
) -> RenderReport:
    """Write ``out_dir/NAME.png`` for each formula; PNGs already there are kept (resumable)."""
    if len(formulas) != len(names):
        raise ValueError("formulas and names differ in length")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RenderReport()
    todo_idx = []
    for i, name in enumerate(names):
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"bad image name: {name!r}")
        if (out_dir / f"{name}.png").exists():
            report.skipped += 1
        else:
            todo_idx.append(i)
    todo = [formulas[i] for i in todo_idx]
    for j, result in iter_render(todo, opts, progress):
        name = names[todo_idx[j]]
        if result.image is None:
            report.failed += 1
            report.failed_names.append(name)
            report.errors[name] = result.error or "failed"
        else:
            _write_png(result.image, out_dir / f"{name}.png")
            report.rendered += 1
    report.failed_names.sort()
    return report
