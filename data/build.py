"""Formula list -> standard IM2LATEX-100K layout (normalize, dedupe, split, render, filter).

Every step reports how many formulas it kept, because the first question about any training
corpus is "how much of it survived, and why not the rest".

Render styles (issue 12): a training formula is rendered in the first of ``styles`` (the
benchmark look, ``cm``, named ``STEM.png`` as always) plus ``extra_styles`` others picked by a
seeded hash of the formula (``STEM_STYLE.png``, one more row of the train split for the same
formula), so the training images grow ``extra_styles + 1``-fold whatever the number of styles.
Validation and test formulas are rendered in ``eval_style`` only (``cm``: scores stay
comparable with every earlier run). A formula whose first-style image fails is dropped; an
extra style that fails or comes out too large loses only that image.

Recovery (issue 13): the ``--render`` corpus formulas (not the fixed val/test ones) go through
data.recover's rewrites of authors' shorthands (``\\R`` -> ``\\mathbb { R }``), and training
images render with its extra packages (amssymb, mathrsfs); the report counts each rewrite, and
says why each dropped formula failed to render (TeX's error or the screen's refusal).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from data.layout import IMAGES_DIR, MAX_TRAIN_TOKENS, SPLITS, write_layout
from data.normalize import NormalizeError, detokenize, normalize
from data.recover import recover, train_style
from data.render import RenderOptions, render_to_dir
from data.styles import DEFAULT_STYLE, get_style, styles_for


@dataclass(frozen=True)
class Filters:
    """The original dataset's filters, applied to train and validate only (test is kept whole so
    that scores are comparable with published ones)."""

    max_tokens: int = MAX_TRAIN_TOKENS
    max_width: int = 500
    max_height: int = 160


RECOVERED_STEP = "recovered by rewriting"  # followed by the count of each shorthand


@dataclass
class BuildReport:
    steps: list[tuple[str, int]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    recovered: Counter = field(default_factory=Counter)  # formulas per data.recover shorthand
    splits: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # one example line per drop reason

    def step(self, what: str, n: int) -> None:
        self.steps.append((what, n))

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, example[:120])

    def lines(self) -> list[str]:
        out = []
        for what, n in self.steps:
            out.append(f"{what:<32} {n:>8}")
            if what == RECOVERED_STEP:
                out += [f"  {name:<30} {k:>8}" for name, k in self.recovered.most_common()]
        out += [f"  dropped: {r:<23} {n:>8}   e.g. {self.examples[r]!r}"
                for r, n in self.dropped.most_common()]
        out += [f"{s:<32} {n:>8}" for s, n in self.splits.items()]
        return out


def image_name(stem: str, style: str) -> str:
    """The PNG name of a formula's image in a style; the default style keeps the plain stem,
    and a corrected style (Style.revision) a new name, so older images are not reused."""
    if style == DEFAULT_STYLE:
        return f"{stem}.png"
    revision = get_style(style).revision
    return f"{stem}_{style}.png" if revision == 0 else f"{stem}_{style}.r{revision}.png"


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


def recover_all(formulas: Sequence[str], report: BuildReport) -> list[str]:
    """data.recover's rewrites, each counted; a rewritten formula equal to an earlier one goes."""
    seen: set[str] = set()
    out = []
    rewritten = 0
    for f in formulas:
        g, used = recover(f)
        rewritten += g != f
        for name in used:
            report.recovered[name] += 1
        if g in seen:
            report.drop("duplicate after recovery", f)
        else:
            seen.add(g)
            out.append(g)
    report.step(RECOVERED_STEP, rewritten)
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
                  progress: bool = True, styles: Sequence[str] = (DEFAULT_STYLE,),
                  extra_styles: int = 1, eval_style: str = DEFAULT_STYLE,
                  style_weights: Mapping[str, float] | None = None,
                  recovery: bool = True, retry_failed: bool = False) -> BuildReport:
    """`lines` are split by `ratios`; `fixed` maps a split to formulas that all go there (e.g. the
    real validation and test sets), and those never appear in another split. `sample` keeps a
    seeded random subset of `lines` (after normalizing and excluding), to fit a time budget.
    `styles`, `extra_styles`, `eval_style`, `style_weights`: the render styles (the weights:
    data.styles.styles_for); `recovery`: data.recover's
    rewrites and training packages (see the module docstring; False builds as v1.1 did);
    `retry_failed`: render again the formulas an earlier run recorded as failing for good
    (data.failed_renders; by default they are reported failed again without TeX)."""
    report = BuildReport()
    fixed_formulas, fixed_splits = _fixed_formulas(fixed or {}, report)
    lines = list(lines)
    report.step("input lines", len(lines))
    formulas = normalize_all(lines, report)
    report.step("normalized, distinct", len(formulas))
    if recovery:
        formulas = recover_all(formulas, report)
    formulas = _select(formulas, set(normalize_all(exclude, BuildReport())) | set(fixed_formulas),
                       sample, seed, report)

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
    split_of = dict(zip(formulas, splits))
    plan = [styles_for(f, styles, extra_styles, seed, style_weights) if split_of[f] == "train"
            else [eval_style] for f in wanted]
    errors = _render_plan(wanted, [split_of[f] for f in wanted], plan, img_dir,
                          render_opts, progress, recovery, retry_failed)
    rows = _collect_rows(wanted, split_of, plan, img_dir, filters, report, errors)
    write_layout(data_dir, wanted, rows)
    report.splits = {f"  {s}": len(r) for s, r in rows.items()}
    return report


def _fixed_formulas(fixed: dict[str, Iterable[str]], report: BuildReport
                    ) -> tuple[list[str], list[str]]:
    """The normalized formulas of the fixed splits and their split names; a formula listed in
    two fixed splits stays in the first."""
    formulas: list[str] = []
    splits: list[str] = []
    seen: set[str] = set()
    for split, split_lines in fixed.items():
        got = [f for f in normalize_all(split_lines, report) if f not in seen]
        seen.update(got)
        report.step(f"{split} (fixed), distinct", len(got))
        formulas += got
        splits += [split] * len(got)
    return formulas, splits


def _select(formulas: list[str], excluded: set[str], sample: int, seed: int,
            report: BuildReport) -> list[str]:
    """Drop the excluded formulas (an --exclude list and the fixed splits' formulas), then keep
    a seeded random `sample` of the rest when one is asked for."""
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
    return formulas


def _render_plan(wanted: Sequence[str], splits: Sequence[str], plan: Sequence[Sequence[str]],
                 img_dir: Path, render_opts: RenderOptions, progress: bool,
                 recovery: bool, retry_failed: bool) -> dict[str, str]:
    """Render every (formula, style) of the plan: one pass per style and split, so each TeX
    document holds one style; images already on disk are kept (a rerun resumes). Returns the
    reason each image failed, by PNG name."""
    stems = [image_stem(f) for f in wanted]
    errors: dict[str, str] = {}
    for style in dict.fromkeys(s for styles in plan for s in styles):
        # What is rendered is the LaTeX the tokens stand for (`\text{if}`, not `\text { i f }`).
        # Training and validation formulas render strictly: TeX's error recovery drops what
        # it cannot typeset, and an image missing part of its label teaches the model to
        # hallucinate. Test formulas render as the original dataset did (pdflatex in
        # nonstopmode), so scores stay comparable. Only training renders get data.recover's
        # packages: validation and test images stay those of every earlier build.
        for split in SPLITS:
            idx = [i for i, styles in enumerate(plan) if style in styles and splits[i] == split]
            if not idx:
                continue
            look = train_style(style) if split == "train" and recovery else style
            opts = replace(render_opts, bucket=True, strict=split != "test", style=look)
            names = [image_name(stems[i], style)[: -len(".png")] for i in idx]
            done = render_to_dir([detokenize(wanted[i]) for i in idx], names, img_dir, opts,
                                 progress=progress, retry_failed=retry_failed)
            errors.update({f"{n}.png": e for n, e in done.errors.items()})
    return errors


def _collect_rows(wanted: Sequence[str], split_of: dict[str, str],
                  plan: Sequence[Sequence[str]], img_dir: Path, filters: Filters,
                  report: BuildReport, errors: dict[str, str]
                  ) -> dict[str, list[tuple[str, int]]]:
    """The split files' rows: each rendered image that passes the size filters. A formula
    whose first-style image is missing or too large is dropped with all its styles."""
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    extra = 0
    for idx, (f, styles) in enumerate(zip(wanted, plan)):
        split = split_of[f]
        for k, style in enumerate(styles):
            name = image_name(image_stem(f), style)
            reason = _unusable(img_dir / name, split, filters, errors.get(name))
            if reason is not None:
                report.drop(reason if k == 0 else f"{style}: {reason}", f)
                if k == 0:
                    break
                continue
            rows[split].append((name, idx))
            extra += k > 0
    report.step("rendered and kept", sum(map(len, rows.values())))
    if extra:
        report.step("  of them in an extra style", extra)
    return rows


def _unusable(path: Path, split: str, filters: Filters, error: str | None) -> str | None:
    """Why an image cannot be used, or None; test images are kept at any size. ``error``: why
    it failed to render, where known (the first words of TeX's error or the screen's refusal)."""
    if not path.is_file():
        return f"failed to render: {error[:40]}" if error else "failed to render"
    if split == "test":
        return None
    with Image.open(path) as im:
        w, h = im.size
    if w > filters.max_width or h > filters.max_height:
        return f"image over {filters.max_width}x{filters.max_height}"
    return None
