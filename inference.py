"""Read formula images and print their LaTeX.

    python inference.py formula.png                    # the shipped model
    python inference.py --model_path runs/x/best.pt scans/ list.txt --json out.json
    python inference.py --backend onnx formula.png     # ONNX Runtime, without torch

PATHs are images (PNG, JPEG, BMP, GIF, TIFF, WebP), folders of images, or list files (.txt/.lst,
one image path per line, relative to the list). Every image is normalized the way the training
renders look (grayscale, dark ink on white, cropped, padded, scaled to the training font size),
so screenshots, scans and inverted images work. An image that cannot be read, normalized within
data/image.py's bounds (noise, dot patterns) or decoded is reported on stderr and in the JSON's
"errors" with the reason, and skipped; the others are still decoded (the exit status is then 2).

Output: one image gives its LaTeX alone; several give `NAME<TAB>LATEX` lines, in input order.
The JSON's results also hold each reading's `score` (mean token log-probability) and
`confidence`: the chance, measured on validation images, that such a reading is exactly right
(null for a model without a calibration made for its weights; bench/confidence.py makes one).
Decoding goes through im2latex.Reader (the Python API), so both give the same readings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data.custom import clean_formula, load_answer_key
from data.files import atomic_write
from data.image import IMAGE_SUFFIXES, ImageError, read_user_readings
from data.normalize import NormalizeError
from data.spelling import OUTPUT_HELP, OUTPUT_SPELLINGS, respell
from im2latex.api import BACKENDS, DEFAULT_ONNX_DIR, Reader
from im2latex.decoding import MAX_LEN
from im2latex.prediction import Prediction

LIST_SUFFIXES = {".txt", ".lst"}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, folders or list files")
    p.add_argument("--model_path", help="checkpoint (.pt) or run dir (default: the shipped "
                                        "checkpoints/im2latex.pt)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="onnx: ONNX Runtime on the CPU, without torch (export_model.py --onnx)")
    p.add_argument("--onnx_path", default=str(DEFAULT_ONNX_DIR),
                   help="with --backend onnx: the exported model's folder")
    p.add_argument("--beam_size", type=int, default=5, help="1: greedy decoding")
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--json", metavar="OUT", help='write {"results": [...]} to this file')
    p.add_argument("--answer", metavar="LATEX",
                   help="expected formula: adds \"match\" to each result (respelled as "
                        "answer keys are: data.custom.clean_formula)")
    p.add_argument("--answer_key", metavar="JSON",
                   help='expected formulas by image or folder name: {"NAME": "LATEX", ...}; '
                        'adds "answer" and "match" (formulas respelled as in --answer)')
    p.add_argument("--attention_figure", metavar="PNG",
                   help="also draw the first 8 images with their attention maps")
    p.add_argument("--no_normalize", action="store_true",
                   help="feed images as they are (already in the training format)")
    p.add_argument("--spelling", choices=OUTPUT_SPELLINGS, default="as_read", help=OUTPUT_HELP)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available; onnx: cpu)")
    return p.parse_args(argv)


def expand(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Image files named by the arguments, in order, plus problems (missing paths, empty
    folders) as messages."""
    files: list[Path] = []
    problems: list[str] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and f.is_file())
            if not found:
                problems.append(f"{p}: no images in this folder")
            files += found
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace")
                     .split("\n") if ln.strip()]
            if not lines:
                problems.append(f"{p}: empty list file")
            files += [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def expected_answer(path: str, answer: str | None, key: dict[str, str]) -> str | None:
    p = Path(path)
    return key.get(p.name, key.get(p.parent.name, answer))


def same_formula(predicted: str, expected: str) -> bool:
    """Token for token, once both have their font switches in one spelling: `{ \\cal L }`
    answers `\\mathcal { L }`, since both typeset the same."""
    return respell(predicted).split() == respell(expected).split()


def read_images(files: list[Path], normalize_them: bool, failures: list[tuple[str, str]]
                ) -> tuple[list[str], list[tuple[np.ndarray, ...]]]:
    """(names, model inputs: each image's readings) of the files that could be read; the
    others go to `failures`."""
    names, images = [], []
    for f in files:
        try:
            images.append(read_user_readings(f, normalize=normalize_them))
            names.append(str(f))
        except (ImageError, OSError) as e:
            failures.append((str(f), str(e) if str(f) in str(e) else f"{f}: {e}"))
    return names, images


def decode_all(reader: Reader, names: list[str], images: list[tuple[np.ndarray, ...]],
               failures: list[tuple[str, str]]) -> list[tuple[str, Prediction]]:
    """Predictions in batches; an image that cannot be decoded even alone (the Reader retries
    a failed batch one image at a time) is reported in `failures`, never the batch."""
    def lost(i: int, e: Exception) -> None:  # out of memory included
        first = str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__
        failures.append((names[i], f"{names[i]}: cannot decode ({first})"))

    preds = reader.decode(images, on_error=lost)
    return [(name, p) for name, p in zip(names, preds) if p is not None]


def load_reader(args: argparse.Namespace) -> Reader:
    """The Reader the flags ask for; ValueError (bad checkpoint or folder, bad device) or
    OSError/ImportError (missing file, onnxruntime not installed) when it cannot be built."""
    onnx = args.backend == "onnx"
    return Reader(args.onnx_path if onnx else args.model_path, backend=args.backend,
                  beam_size=args.beam_size, device=args.device, batch_size=args.batch_size,
                  max_len=args.max_len, normalize=not args.no_normalize,
                  spelling=None if args.spelling == "as_read" else args.spelling)


def write_json(path: str, results: list[dict], failures: list[tuple[str, str]]) -> None:
    doc = {"results": results, "errors": [{"name": n, "error": m} for n, m in failures]}
    atomic_write(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.attention_figure and args.backend != "torch":
        print("error: --attention_figure needs --backend torch", file=sys.stderr)
        return 1
    files, problems = expand(args.paths)
    failures = [(msg.split(": ", 1)[0], msg) for msg in problems]
    try:
        answer = clean_formula(args.answer)[0] if args.answer is not None else None
        key = load_answer_key(args.answer_key) if args.answer_key else {}
    except (NormalizeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names, images = read_images(files, not args.no_normalize, failures)
    if not images:
        for _, msg in failures:
            print(f"error: {msg}", file=sys.stderr)
        print("error: no readable images", file=sys.stderr)
        if args.json:
            write_json(args.json, [], failures)
        return 1

    for _, msg in failures:
        print(f"error: {msg}", file=sys.stderr)
    try:
        reader = load_reader(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if reader.calibration_note:
        print(f"note: {reader.calibration_note}", file=sys.stderr)
    unreadable = len(failures)
    decoded = decode_all(reader, names, images, failures)
    for _, msg in failures[unreadable:]:
        print(f"error: {msg}", file=sys.stderr)
    if args.attention_figure:
        from model.attention_plot import attention_figure

        backend = reader.backend
        chosen = {name: images[names.index(name)][p.reading] for name, p in decoded[:8]}
        attention_figure(backend.model, backend.vocab, list(chosen.values()), args.attention_figure,
                         list(chosen), max_len=args.max_len, device=backend.device)
    results = []
    for name, pred in decoded:
        r = {"name": name, "predict": pred.latex, "score": round(pred.score, 4),
             "confidence": None if pred.confidence is None else round(pred.confidence, 4)}
        expected = expected_answer(name, answer, key)
        if expected is not None:
            r["answer"], r["match"] = expected, same_formula(pred.latex, expected)
        results.append(r)
    if args.json:
        write_json(args.json, results, failures)
    else:
        for r in results:
            print(r["predict"] if len(results) == 1 and not failures else
                  f"{r['name']}\t{r['predict']}")
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
