"""See the shipped model read formulas it never trained on.

    python demo.py                      # 12 formulas, a fresh seed (printed)
    python demo.py --seed 7 --count 5   # the same 5 formulas every time

The story, top to bottom:
1. Draw COUNT formulas at random (the seed is printed) from data/demo_formulas.txt, a seeded
   sample of IM2LATEX-100K *test* formulas committed with the code, so nothing is downloaded
   and nobody picked the examples by hand.
2. Render each on the spot in the training look (data/render.py, Computer Modern; needs TeX),
   and make a screenshot-like copy of it (data/conditions.py's "screenshot": enlarged, cropped
   unevenly, gray page, JPEG), as bench/robustness.py does.
3. Read both image files the way inference.py reads a user's file (im2latex.Reader: the one
   user-image pipeline, then beam search), with the shipped model checkpoints/im2latex.pt.
4. Typeset each reading again and compare it with the truth's render, column by column (Deng
   et al.'s image match, as evaluate.py --render): `{\frac{1}{2}}` for `\frac{1}{2}` is a
   different token sequence but the same picture.
5. Print the truth and both readings one under the other with a score (token edit similarity,
   percent), whether every token is right and whether the picture is, then how many were read
   exactly, and the command that starts the web page.
"""

from __future__ import annotations

import argparse
import random
import secrets
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.conditions import CONDITIONS
from data.layout import read_lines
from data.metrics import image_scores, text_scores
from data.normalize import detokenize
from data.render import RenderError, RenderOptions, render_formulas, render_results
from data.vocab import VocabError
from im2latex import ImageError, Reader
from model.checkpoint import DEFAULT_MODEL, CheckpointError

ROOT = Path(__file__).resolve().parent
FORMULAS = ROOT / "data" / "demo_formulas.txt"
VIEWS = ("clean", "screenshot")  # data/conditions.py names, in the table's order


@dataclass(frozen=True)
class DemoConfig:
    """One demo run; the command-line flags map onto these."""

    seed: int
    count: int = 12
    formulas: Path = FORMULAS
    model_path: Path = DEFAULT_MODEL
    beam_size: int = 5
    threads: int | None = None  # torch's default when None
    images: Path | None = None  # where to keep the image files, to try them elsewhere


@dataclass
class Example:
    """One formula: its truth, and per view the image file and the model's reading (None where
    the formula did not render or normalization refused the image)."""

    truth: str
    image: np.ndarray | None  # the truth's render
    files: dict[str, bytes] = field(default_factory=dict)
    readings: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(VIEWS))
    same_picture: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(VIEWS, False))
    note: str = ""


def get_config(argv: list[str] | None = None) -> DemoConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, help="which formulas (default: a fresh one, printed)")
    p.add_argument("--count", type=int, default=DemoConfig.count, help="formulas to read")
    p.add_argument("--formulas", type=Path, default=FORMULAS,
                   help="normalized formulas, one a line ('#' lines at the top are a header)")
    p.add_argument("--model_path", type=Path, default=DEFAULT_MODEL,
                   help="checkpoint (.pt) or run dir")
    p.add_argument("--beam_size", type=int, default=DemoConfig.beam_size, help="1: greedy")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--images", type=Path, metavar="DIR", help="also write the image files here")
    a = p.parse_args(argv)
    if a.count < 1 or a.beam_size < 1 or (a.threads is not None and a.threads < 1):
        p.error("--count, --beam_size and --threads must be at least 1")
    seed = secrets.randbelow(10_000) if a.seed is None else a.seed
    return DemoConfig(seed, a.count, a.formulas, a.model_path, a.beam_size, a.threads, a.images)


def read_formula_file(path: Path) -> list[str]:
    """The formulas of a demo formula file: its lines after the '#' header, blank ones skipped."""
    if not path.is_file():
        raise ValueError(f"formula file {path} not found")
    lines = read_lines(path)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    formulas = [f for f in lines if f.strip()]
    if not formulas:
        raise ValueError(f"{path}: no formulas")
    return formulas


def draw(formulas: list[str], count: int, seed: int) -> list[str]:
    """A random sample in draw order; the same seed draws the same formulas. (The committed
    file itself is draw(test formulas, 200, 14): see its header.)"""
    return random.Random(seed).sample(formulas, min(count, len(formulas)))


def make_files(truths: list[str], seed: int) -> list[Example]:
    """Each formula rendered once, then turned into one image file per view. Each view's
    randomness depends on the seed, its name and the formula's position only."""
    renders = render_results([detokenize(t) for t in truths], RenderOptions())
    examples = []
    for i, (truth, r) in enumerate(zip(truths, renders)):
        ex = Example(truth, r.image)
        if r.image is None:
            ex.note = f"did not render: {(r.error or 'unknown error').splitlines()[0][:80]}"
        else:
            for view in VIEWS:
                rng = np.random.default_rng([seed, zlib.crc32(view.encode()), i])
                ex.files[view] = CONDITIONS[view].make(r.image, rng)
        examples.append(ex)
    return examples


def read_all(examples: list[Example], cfg: DemoConfig) -> None:
    """Every image file through the user's path (im2latex.Reader, as inference.py), decoded in
    one run; an image that normalization refuses reads as nothing (what a user would get)."""
    reader = Reader(cfg.model_path, beam_size=cfg.beam_size)
    slots, images = [], []
    for ex in examples:
        for view, data in ex.files.items():
            try:
                images.append(reader.readings(data, f"{view}.img"))
                slots.append((ex, view))
            except ImageError:
                ex.readings[view] = ""
    for (ex, view), pred in zip(slots, reader.decode(images)):
        ex.readings[view] = pred.latex


def compare_pictures(examples: list[Example]) -> None:
    """Each reading typeset again (one render run) and compared with the truth's render: a
    match is pixel columns equal once both are cropped to the ink (data.metrics.image_scores)."""
    slots = [(ex, v) for ex in examples for v in VIEWS if ex.image is not None and ex.readings[v]]
    renders = render_formulas([detokenize(ex.readings[v]) for ex, v in slots], RenderOptions())
    for (ex, view), img in zip(slots, renders):
        ex.same_picture[view] = image_scores([ex.image], [img])["image_exact_match"] == 100


def similarity(truth: str, reading: str) -> float:
    """Token edit similarity in percent (100: every token right), as evaluate.py reports it."""
    return text_scores([truth], [reading])["edit_distance"]


def exact(truth: str, reading: str | None) -> bool:
    return reading is not None and reading.split() == truth.split()


def format_table(examples: list[Example]) -> str:
    """Truth and readings one under the other, as compilable LaTeX, so that differences line up
    at the start of the formula; score and verdict come first so that they line up too."""
    lines = [f"{'#':>3}  {'image':<10} {'score':>6}  {'exact':<5}  {'picture':<7}  LaTeX", ""]
    for k, ex in enumerate(examples, 1):
        lines.append(f"{k:>3}  {'truth':<10} {'':>6}  {'':<5}  {'':<7}  {detokenize(ex.truth)}")
        if ex.note:
            lines.append(f"{'':>3}  {'':<10} {'':>6}  {'':<5}  {'':<7}  ({ex.note})")
        for view in VIEWS:
            got = ex.readings[view]
            if got is None:
                continue
            verdict = "yes" if exact(ex.truth, got) else "no"
            picture = "same" if ex.same_picture[view] else "differs"
            shown = detokenize(got) if got else "(image refused: nothing read)"
            lines.append(f"{'':>3}  {view:<10} {similarity(ex.truth, got):>6.1f}  {verdict:<5}  "
                         f"{picture:<7}  {shown}")
        lines.append("")
    return "\n".join(lines)


def summary(examples: list[Example]) -> list[str]:
    """The exact-count line, then BLEU-4 over the same images for comparison with the tables."""
    counts, pictures, bleu = [], [], []
    for view in VIEWS:
        read = [ex for ex in examples if ex.readings[view] is not None]
        right = sum(exact(ex.truth, ex.readings[view]) for ex in read)
        counts.append(f"{right}/{len(read)} {view}")
        pictures.append(f"{sum(ex.same_picture[view] for ex in read)}/{len(read)} {view}")
        if read:
            score = text_scores([ex.truth for ex in read], [ex.readings[view] for ex in read])
            bleu.append(f"{view} {score['bleu4']:.1f}")
    lines = [f"read exactly right: {', '.join(counts)}",
             f"typeset the same as the truth: {', '.join(pictures)}"]
    unrendered = sum(bool(ex.note) for ex in examples)
    if unrendered:
        lines.append(f"({unrendered} of {len(examples)} formulas did not render: not counted)")
    return lines + [f"BLEU-4 over these images: {', '.join(bleu)}"]


def save_images(examples: list[Example], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ex in enumerate(examples, 1):
        for view, data in ex.files.items():
            suffix = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            (folder / f"{k:02d}_{view}{suffix}").write_bytes(data)


def web_page_line() -> str:
    """How to start the web page, with the address serve.py's defaults give."""
    import serve

    args = serve.get_args([])
    return ("See it in a browser (drop, paste or choose a formula image):\n"
            f"  python serve.py     # then open http://{args.host}:{args.port}")


def shown(path: Path) -> str:
    """A path as short as it can be said from here."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def intro(cfg: DemoConfig, count: int) -> str:
    """What the table shows and how it was made, wrapped for a terminal."""
    text = (f"The model {shown(cfg.model_path)} reads {count} IM2LATEX-100K test formulas it "
            f"never trained on, drawn at random from {shown(cfg.formulas)} with seed {cfg.seed}. "
            "Each is rendered now in the training look (Computer Modern) and made into a "
            f"screenshot-like image ({CONDITIONS['screenshot'].description}); both files are "
            f"read as inference.py reads yours, beam {cfg.beam_size}. score: token edit "
            "similarity to the truth (percent); exact: every token right; picture: the reading "
            "typeset again is the truth's render, pixel columns equal.")
    again = f"The same formulas again: python demo.py --seed {cfg.seed} --count {cfg.count}"
    return f"{textwrap.fill(text, 100)}\n{again}\n"


def main(argv: list[str] | None = None) -> int:
    cfg = get_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        truths = draw(read_formula_file(cfg.formulas), cfg.count, cfg.seed)
        print(intro(cfg, len(truths)), flush=True)
        start = time.perf_counter()
        examples = make_files(truths, cfg.seed)
        read_all(examples, cfg)
        compare_pictures(examples)
    except (ValueError, RenderError, CheckpointError, VocabError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(examples))
    print("\n".join(summary(examples)))
    print(f"(rendered and read in {time.perf_counter() - start:.1f} s, "
          f"{torch.get_num_threads()} torch threads)")
    if cfg.images:
        save_images(examples, cfg.images)
        print(f"The image files are in {cfg.images}: try python inference.py {cfg.images}")
    print(web_page_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
