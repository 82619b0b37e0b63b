"""Formula list -> standard IM2LATEX-100K layout (normalize, dedupe, split, render, filter).

Every step reports how many formulas it kept, because the first question about any training
corpus is "how much of it survived, and why not the rest".
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from data.layout import IMAGES_DIR, SPLITS, write_layout
from data.normalize import NormalizeError, detokenize, normalize
from data.render import RenderOptions, render_to_dir


@dataclass(frozen=True)
class Filters:
    """The original dataset's filters, applied to train and validate only (test is kept whole so
    that scores are comparable with published ones)."""

    max_tokens: int = 150
    max_width: int = 500
    max_height: int = 160


@dataclass
class BuildReport:
    steps: list[tuple[str, int]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    splits: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # one example line per drop reason

    def step(self, what: str, n: int) -> None:
        self.steps.append((what, n))

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, example[:120])

    def lines(self) -> list[str]:
        out = [f"{what:<32} {n:>8}" for what, n in self.steps]
        out += [f"  dropped: {r:<23} {n:>8}   e.g. {self.examples[r]!r}"
                for r, n in self.dropped.most_common()]
        out += [f"{s:<32} {n:>8}" for s, n in self.splits.items()]
        return out


def image_stem(formula: str) -> str:
    """A content-addressed file name (without `.png`), so reruns (resume) and rebuilds find the
    same image."""
    return hashlib.sha1(formula.encode("utf-8")).hexdigest()[:16]


def normalize_all(lines: Iterable[str], report: BuildReport) -> list[str]:
    """Normalized, non-empty, first-occurrence-only formulas, in input order."""
    seen: set[str] = set()
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            f = normalize(line)
        except NormalizeError as e:
            report.drop(f"normalize: {str(e)[:40]}", line)
            continue
        if not f:
            report.drop("empty after normalizing", line)
        elif f in seen:
            report.drop("duplicate", line)
        else:
            seen.add(f)
            out.append(f)
    return out


def assign_splits(n: int, ratios: Sequence[float], seed: int) -> list[str]:
    """A split name per formula: a seeded shuffle cut at the given ratios."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError("split ratios must be three non-negative numbers (train validate test)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    total = sum(ratios)
    cut1 = round(n * ratios[0] / total)
    cut2 = cut1 + round(n * ratios[1] / total)
    split = [""] * n
    for rank, i in enumerate(order):
        split[i] = SPLITS[0] if rank < cut1 else SPLITS[1] if rank < cut2 else SPLITS[2]
    return split


def build_dataset(lines: Iterable[str], data_dir: str | Path, *, ratios: Sequence[float],
                  seed: int = 0, exclude: Iterable[str] = (),
                  fixed: dict[str, Iterable[str]] | None = None, sample: int = 0,
                  filters: Filters = Filters(), render_opts: RenderOptions = RenderOptions(),
                  progress: bool = True) -> BuildReport:
    """`lines` are split by `ratios`; `fixed` maps a split to formulas that all go there (e.g. the
    real validation and test sets), and those never appear in another split. `sample` keeps a
    seeded random subset of `lines` (after normalizing and excluding), to fit a time budget."""
    report = BuildReport()
    fixed_formulas: list[str] = []
    fixed_splits: list[str] = []
    seen: set[str] = set()
    for split, split_lines in (fixed or {}).items():
        got = [f for f in normalize_all(split_lines, report) if f not in seen]
        seen.update(got)
        report.step(f"{split} (fixed), distinct", len(got))
        fixed_formulas += got
        fixed_splits += [split] * len(got)
    lines = list(lines)
    report.step("input lines", len(lines))
    formulas = normalize_all(lines, report)
    report.step("normalized, distinct", len(formulas))

    excluded = set(normalize_all(exclude, BuildReport())) | seen
    if excluded:
        kept = []
        for f in formulas:
            if f in excluded:
                report.drop("in an --exclude list or a fixed split", f)
            else:
                kept.append(f)
        formulas = kept
        report.step("after exclusions", len(formulas))
    if sample and len(formulas) > sample:
        keep = set(random.Random(seed).sample(range(len(formulas)), sample))
        formulas = [f for i, f in enumerate(formulas) if i in keep]
        report.step(f"--sample {sample}", len(formulas))

    splits = fixed_splits + assign_splits(len(formulas), ratios, seed)
    formulas = fixed_formulas + formulas
    wanted = []
    for f, s in zip(formulas, splits):
        if s != "test" and len(f.split()) > filters.max_tokens:
            report.drop(f"over {filters.max_tokens} tokens", f)
        else:
            wanted.append(f)
    report.step("to render", len(wanted))

    data_dir = Path(data_dir)
    img_dir = data_dir / IMAGES_DIR
    stems = [image_stem(f) for f in wanted]
    split_of = dict(zip(formulas, splits))
    # What is rendered is the LaTeX the tokens stand for (`\text{if}`, not `\text { i f }`).
    # Training formulas render strictly: TeX's error recovery drops what it cannot typeset, and
    # an image missing part of its label teaches the model to hallucinate. Test formulas render
    # as the original dataset did (pdflatex in nonstopmode), so scores stay comparable.
    for strict in (True, False):
        idx = [i for i, f in enumerate(wanted) if (split_of[f] != "test") == strict]
        opts = replace(render_opts, bucket=True, strict=strict)
        render_to_dir([detokenize(wanted[i]) for i in idx], [stems[i] for i in idx], img_dir,
                      opts, progress=progress)

    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for idx, (f, stem) in enumerate(zip(wanted, stems)):
        name = stem + ".png"
        path = img_dir / name
        if not path.is_file():
            report.drop("failed to render", f)
            continue
        split = split_of[f]
        if split != "test":
            with Image.open(path) as im:
                w, h = im.size
            if w > filters.max_width or h > filters.max_height:
                report.drop(f"image over {filters.max_width}x{filters.max_height}", f)
                continue
        rows[split].append((name, idx))
    report.step("rendered and kept", sum(map(len, rows.values())))
    write_layout(data_dir, wanted, rows)
    report.splits = {f"  {s}": len(r) for s, r in rows.items()}
    return report
