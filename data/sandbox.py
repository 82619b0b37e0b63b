"""An OS sandbox (bubblewrap) around the renderer's TeX and Ghostscript processes.

Why: kpathsea's ``openin_any=p`` judges a file name as written, before it expands ``~user/``
or ``$VAR/``, and a lexical screen of formulas can always miss a spelling; so the programs run
where the files worth stealing do not exist. ``bwrap`` gives them fresh namespaces (no
network, no other processes, no host users: ``~user`` has no ``/etc/passwd`` to resolve),
drops every capability, and builds a root holding only read-only binds of what pdfTeX and
Ghostscript need (programs, libraries, the TeX tree, Ghostscript's resources and fonts), an
empty ``HOME``, a tmpfs ``/tmp``, a minimal ``/proc`` and ``/dev``, and the work directory, the
only writable host path; the root itself is read-only. The processes die with their parent.

Where bwrap cannot start (not installed, or no unprivileged user namespaces) the renderer keeps
its other limits (kpathsea, rlimits, timeouts) and says so once per process.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

BWRAP = "bwrap"  # a module attribute so that tests can point it at a missing program

# What pdfTeX and Ghostscript read; missing ones are skipped (other distributions, TeX Live
# installed by hand under /usr/local/texlive). Nothing here holds user data.
_READ_ONLY = (
    "/usr/bin", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32",
    "/etc/ld.so.cache", "/etc/texmf", "/usr/share/texlive", "/usr/share/texmf",
    "/var/lib/texmf", "/usr/local/texlive", "/usr/share/ghostscript", "/var/lib/ghostscript",
    "/usr/share/color/icc", "/usr/share/fonts", "/usr/share/poppler",
)
# Merged-/usr systems have these as symlinks; others as real directories.
_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
SANDBOX_HOME = "/home/tex"


def _root_args() -> list[str]:
    args: list[str] = []
    for path in _TOP_LEVEL:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _READ_ONLY:
        args += ["--ro-bind-try", path, path]
    return args


def bwrap_args(workdir: Path) -> list[str]:
    """bwrap's options for a process that may write only ``workdir`` (its cwd)."""
    work = str(Path(workdir).resolve())
    return [
        BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        *_root_args(), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--dir", SANDBOX_HOME, "--setenv", "HOME", SANDBOX_HOME,
        "--bind", work, work, "--remount-ro", "/", "--chdir", work, "--",
    ]


@functools.cache
def available() -> bool:
    """Whether bwrap runs here; checked once per process, with one warning when it does not."""
    reason = None
    if shutil.which(BWRAP) is None:
        reason = f"{BWRAP} not found (apt-get install bubblewrap)"
    else:
        with tempfile.TemporaryDirectory(prefix="im2latex-sandbox-check-") as tmp:
            try:
                done = subprocess.run(
                    [*bwrap_args(Path(tmp)), "true"], stdin=subprocess.DEVNULL,
                    capture_output=True, timeout=30,
                )
                if done.returncode != 0:
                    reason = done.stderr.decode(errors="replace").strip()[-300:] or "failed"
            except (OSError, subprocess.TimeoutExpired) as e:
                reason = str(e)
    if reason is not None:
        warnings.warn(
            f"TeX and Ghostscript run WITHOUT the OS sandbox ({reason}); only kpathsea "
            "limits, rlimits and timeouts apply", RuntimeWarning, stacklevel=2,
        )
    return reason is None


def sandboxed(argv: Sequence[str], workdir: Path, enabled: bool = True) -> list[str]:
    """``argv`` run inside the sandbox, or as is when disabled or unavailable."""
    if enabled and available():
        return [*bwrap_args(workdir), *argv]
    return list(argv)
