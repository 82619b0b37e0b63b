"""How well does a model read formula images that are not our renders? One table, one row per
condition: BLEU-4 and exact match over the same formulas.

    python bench/robustness.py                           # shipped model, 200 test formulas, beam 5
    python bench/robustness.py --n 50 --beam_size 1 --conditions clean screenshot val_images
    python bench/robustness.py --split val --json out.json
    python bench/robustness.py --split val --conditions clean low_res --errors 20
                                        # what low_res readings change from the clean ones

Formulas are the first N of the real IM2LATEX-100K test (or, --split val, validation) formulas:
never training formulas. It is a report, not a tuning target; validation formulas decide.

Rows (--conditions picks a subset; all by default):
  clean, screenshot, low_res, noise, inverted, blur   data/conditions.py, made from our render
  style:NAME        the formula rendered in another style of data/styles.py (fonts, sizes,
                    resolutions, anti-aliasing), as it is: a new style is a new row
  val_images        the other pipeline's renders of validation formulas (val.matching.txt)
  scale:F           only when named: our render resampled by F and left so (low_res is
                    scale:0.6); `--conditions clean scale:0.9 scale:0.8 scale:0.7` reads
                    BLEU-4 against glyph size
Every image goes the way a user's file does in inference.py: image file bytes -> load_image ->
normalize_user_image -> model_input. An image that normalization refuses scores as an empty
prediction (the user gets nothing); a formula that fails to render is left out of that row.
Scores come from data/metrics.py, as evaluate.py's do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.conditions import CONDITIONS, SCALE_PREFIX, condition  # noqa: E402
from data.files import atomic_write  # noqa: E402
from data.image import ImageError, read_user_readings  # noqa: E402
from data.layout import read_lines, read_matching  # noqa: E402
from data.metrics import text_scores  # noqa: E402
from data.normalize import detokenize  # noqa: E402
from data.render import RenderError, RenderOptions, render_formulas  # noqa: E402
from data.styles import DEFAULT_STYLE, STYLES  # noqa: E402
from data.token_edits import KINDS, summarize  # noqa: E402
from im2latex.api import Prediction, Reader  # noqa: E402
from im2latex.decoding import MAX_LEN  # noqa: E402
from model.checkpoint import DEFAULT_MODEL  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "im2latex100k"
VAL_IMAGES = "val_images"
STYLE_PREFIX = "style:"


@dataclass
class Row:
    """One condition's inputs: model inputs (None where normalization refused the image) and
    the reference formula of each."""

    name: str
    description: str
    images: list[tuple[np.ndarray, ...] | None] = field(default_factory=list)  # readings
    refs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # each image's formula position among the first N (rows made from renders): pairs a row's
    # readings with the clean row's for --errors
    ids: list[int] = field(default_factory=list)


def style_names() -> list[str]:
    """Render styles other than the default (which is the clean row)."""
    return [s for s in STYLES if s != DEFAULT_STYLE]


def style_description(name: str) -> str:
    """What a style changes from the standard look, in a few words from its registry entry."""
    style = STYLES[name]
    parts = re.findall(r"\\usepackage(?:\[[^]]*\])?\{(\w+)\}", " ".join(style.packages))
    parts = ["+".join(parts)] if parts else []
    parts += [style.size] if style.size != STYLES[DEFAULT_STYLE].size else []
    parts += [] if style.display else ["text style"]
    parts += [f"{style.dpi} dpi"] if style.dpi else []
    parts += [] if style.binary else ["anti-aliased"]
    return "render style: " + ", ".join(parts)


def known_conditions() -> list[str]:
    return [*CONDITIONS, *(STYLE_PREFIX + s for s in style_names()), VAL_IMAGES]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="formulas (and val_images) per row")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="whose formulas are rendered")
    p.add_argument("--formulas", type=Path,
                   help="a normalized formula file instead of --split's (one formula a line)")
    p.add_argument("--conditions", nargs="+", metavar="NAME", help="rows to run (default: all)")
    p.add_argument("--model_path", default=str(DEFAULT_MODEL), help="checkpoint (.pt) or run dir")
    p.add_argument("--beam_size", type=int, default=5, help="1: greedy decoding")
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seeds every random condition")
    p.add_argument("--val_images", type=Path, default=DATA / "val_images")
    p.add_argument("--val_matching", type=Path, default=DATA / "val.matching.txt")
    p.add_argument("--val_formulas", type=Path, default=DATA / "val.formulas.norm.txt")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON here")
    p.add_argument("--examples", type=Path, metavar="DIR",
                   help="write the first 3 image files of each row here, to look at")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--errors", type=int, default=0, metavar="TOP",
                   help="after the table, what each rendered row's readings change from the "
                        "clean row's, by kind (accent, font, sized delimiter, ...; "
                        "data/token_edits.py), with its TOP most frequent edits")
    p.add_argument("--no_normalize", dest="normalize", action="store_false",
                   help="feed every image as it is, not through normalize_user_image: beside "
                        "the default table, says which rows normalization helps or costs")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    if args.errors < 0:
        p.error("--errors must be 0 (off) or more")
    return args


def check_conditions(requested: list[str] | None) -> list[str]:
    """The conditions to run, in the table's order, then any scale rows in the order asked
    (each once, spelled as its condition names it: scale:0.70 is scale:0.7); an unknown name
    or a scale row's bad factor is an error."""
    known = known_conditions()
    if requested is None:
        return known
    scales = list(dict.fromkeys(c.name for n in requested
                                if n.startswith(SCALE_PREFIX) and (c := condition(n))))
    unknown = [n for n in requested if n not in known and not n.startswith(SCALE_PREFIX)]
    if unknown:
        raise ValueError(f"unknown condition {unknown[0]!r} (known: {', '.join(known)}, "
                         f"{SCALE_PREFIX}F)")
    return [n for n in known if n in requested] + scales


def read_formulas(args: argparse.Namespace) -> list[str]:
    path = args.formulas or DATA / f"{args.split}.formulas.norm.txt"
    if not path.is_file():
        raise ValueError(f"formula file {path} not found")
    formulas = [f.strip() for f in read_lines(path) if f.strip()][:args.n]
    if not formulas:
        raise ValueError(f"{path}: no formulas")
    return formulas


def user_input(data: bytes, name: str, normalize: bool = True) -> tuple[np.ndarray, ...] | None:
    """An image file as inference.py reads it (its readings); None where normalization (or, fed
    as it is, the largest bucket) refuses it."""
    try:
        return read_user_readings(data, name, normalize=normalize)
    except ImageError:
        return None


def render(formulas: list[str], style: str, quiet: bool) -> list[np.ndarray | None]:
    return render_formulas([detokenize(f) for f in formulas], RenderOptions(style=style),
                           progress=not quiet)


def rendered_rows(names: list[str], formulas: list[str], seed: int, quiet: bool,
                  save: Path | None, normalize: bool = True) -> list[Row]:
    """The rows made from renders: each image condition of the default render, then each style
    (its clean look). Each condition's randomness depends on the seed, its name and the
    formula's position only, so a row is the same whatever else runs with it."""
    rows: list[Row] = []
    transforms = [n for n in names if condition(n) is not None]
    sources = [(DEFAULT_STYLE, transforms)] if transforms else []
    sources += [(n[len(STYLE_PREFIX):], [n]) for n in names if n.startswith(STYLE_PREFIX)]
    for style, row_names in sources:
        clean = render(formulas, style, quiet)
        failed = sum(img is None for img in clean)
        for name in row_names:
            cond = condition(name)
            row = Row(name, cond.description if cond else style_description(style))
            if failed:
                row.notes.append(f"{failed} of {len(formulas)} formulas did not render")
            for i, (img, ref) in enumerate(zip(clean, formulas)):
                if img is None:
                    continue
                data = condition_file(name, img, i, seed)
                save_example(save, name, i, data)
                row.images.append(user_input(data, f"{name}/{i}", normalize))
                row.refs.append(ref)
                row.ids.append(i)
            rows.append(row)
    return rows


def condition_file(name: str, img: np.ndarray, i: int, seed: int) -> bytes:
    """Row `name`'s image file of the i-th formula's render: its condition (the clean one for a
    style row) drawn from randomness that depends on the seed, the row's name and i only."""
    cond = condition(name) or CONDITIONS["clean"]
    return cond.make(img, np.random.default_rng([seed, zlib.crc32(name.encode()), i]))


def val_images_row(args: argparse.Namespace, normalize: bool = True) -> Row:
    """The other pipeline's images of the first N validation formulas, read as user files."""
    for f in (args.val_images, args.val_matching, args.val_formulas):
        if not f.exists():
            raise ValueError(f"{f} not found (needed by the {VAL_IMAGES} row)")
    entries, problems = read_matching(args.val_matching, args.val_images,
                                      read_lines(args.val_formulas))
    row = Row(VAL_IMAGES, "the other pipeline's renders (validation formulas)",
              notes=[f"{len(problems)} matching lines skipped"] if problems else [])
    for i, e in enumerate(entries[:args.n]):
        data = Path(e.image).read_bytes()
        save_example(args.examples, VAL_IMAGES, i, data)
        row.images.append(user_input(data, str(e.image), normalize))
        row.refs.append(e.formula)
    return row


def save_example(folder: Path | None, name: str, i: int, data: bytes) -> None:
    if folder is None or i >= 3:
        return
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
    (folder / f"{name.replace(':', '_')}_{i}{suffix}").write_bytes(data)


def decode(rows: list[Row], args: argparse.Namespace) -> list[list[Prediction | None]]:
    """Predictions of every row through im2latex.Reader (as inference.py decodes), in one pass
    so that images of one size share batches across rows; None for refused images."""
    reader = Reader(args.model_path, beam_size=args.beam_size, device=args.device,
                    batch_size=args.batch_size, max_len=args.max_len)
    flat = [img for row in rows for img in row.images if img is not None]
    bar = tqdm(total=sum(map(len, flat)), desc="decoding", unit="img", disable=args.quiet)
    preds = iter(reader.decode(flat, on_batch=bar.update))
    bar.close()
    return [[None if img is None else next(preds) for img in row.images] for row in rows]


def score(rows: list[Row], preds: list[list[Prediction | None]]) -> list[dict]:
    """One table row per condition; a refused image scores as the empty reading. `second`:
    the images read from their second reading (an ambiguous glyph scale, im2latex.api)."""
    table = []
    for row, p in zip(rows, preds):
        h = ["" if x is None else x.latex for x in p]
        s = text_scores(row.refs, h) if row.refs else {"bleu4": 0.0, "exact_match": 0.0,
                                                       "edit_distance": 0.0}
        table.append({"condition": row.name, "description": row.description,
                      "images": len(row.refs), "refused": sum(i is None for i in row.images),
                      "second": sum(x is not None and x.reading > 0 for x in p),
                      "bleu4": round(s["bleu4"], 2), "exact_match": round(s["exact_match"], 2),
                      "edit_distance": round(s["edit_distance"], 2), "notes": row.notes})
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'condition':<16} {'images':>6} {'refused':>7} {'second':>6} {'BLEU-4':>7} "
             f"{'exact %':>7}  description"]
    for r in table:
        lines.append(f"{r['condition']:<16} {r['images']:>6} {r['refused']:>7} {r['second']:>6} "
                     f"{r['bleu4']:>7.2f} {r['exact_match']:>7.2f}  {r['description']}")
        lines += [f"{'':<16} note: {n}" for n in r["notes"]]
    if table:
        lines.append(f"{'mean':<16} {'':>6} {'':>7} {'':>6} {mean_bleu(table):>7.2f} {'':>7}  "
                     f"unweighted mean of the {len(table)} rows' BLEU-4")
    return "\n".join(lines)


def error_report(rows: list[Row], preds: list[list[Prediction | None]], top: int) -> str:
    """For each row made from renders, the edits that turn the clean image's reading of a
    formula into the row's (data/token_edits.py): whether a row's gap is marks its pixels no
    longer show (accents, font switches, delimiter sizes) or glyphs misread. Refused images
    and formulas without a clean reading are left out (the table counts them)."""
    clean_row, clean_preds = next((r, p) for r, p in zip(rows, preds) if r.name == "clean")
    clean = {i: p.latex.split() for i, p in zip(clean_row.ids, clean_preds) if p is not None}
    lines = []
    for row, p in zip(rows, preds):
        if row.name == "clean" or not row.ids:
            continue
        pairs = [(clean[i], x.latex.split()) for i, x in zip(row.ids, p)
                 if x is not None and i in clean]
        s = summarize(pairs)
        per = 100 / max(s.tokens, 1)
        lines.append(f"{row.name}: {sum(s.by_kind.values())} edits from the clean readings of "
                     f"{len(pairs)} formulas ({s.tokens} tokens)")
        lines.append(f"  {'kind':<16} {'edits':>6} {'tokens':>6} {'per 100 tokens':>15}")
        for kind in KINDS:
            lines.append(f"  {kind:<16} {s.by_kind[kind]:>6} {s.tokens_by_kind[kind]:>6} "
                         f"{s.tokens_by_kind[kind] * per:>15.2f}")
        for e, n in s.edits.most_common(top):
            lines.append(f"  {n:>4} x  {' '.join(e.a) or '(nothing)'}  ->  "
                         f"{' '.join(e.b) or '(nothing)'}   [{e.kind}]")
    return "\n".join(lines)


def mean_bleu(table: list[dict]) -> float:
    """One figure to compare models by: every condition counts the same, whatever its size,
    since each row is a kind of input a user may bring (docs/training.md's robustness mean)."""
    return round(sum(r["bleu4"] for r in table) / len(table), 2)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        names = check_conditions(args.conditions)
        if args.errors and "clean" not in names:
            raise ValueError("--errors compares each row with the clean row: add clean to "
                             "--conditions")
        rendered = [n for n in names if n != VAL_IMAGES]
        formulas = read_formulas(args) if rendered else []
        rows = rendered_rows(rendered, formulas, args.seed, args.quiet, args.examples,
                             args.normalize)
        if VAL_IMAGES in names:
            rows.append(val_images_row(args, args.normalize))
    except (ValueError, RenderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    order = {n: k for k, n in enumerate(names)}
    rows.sort(key=lambda r: order[r.name])
    preds = decode(rows, args) if rows else []
    table = score(rows, preds)
    print(f"model {args.model_path}, beam {args.beam_size}, first {args.n} "
          f"{args.formulas or args.split} formulas, seed {args.seed}"
          + ("" if args.normalize else ", images fed as they are (--no_normalize)"))
    print(format_table(table))
    if args.errors:
        print(error_report(rows, preds, args.errors))
    if args.json:
        doc = {"model_path": str(args.model_path), "beam_size": args.beam_size, "n": args.n,
               "formulas": str(args.formulas or args.split), "seed": args.seed,
               "normalize": args.normalize,
               "rows": table, "mean_bleu4": mean_bleu(table) if table else None}
        atomic_write(args.json, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
