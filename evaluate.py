"""Decode a labelled split and score it: BLEU-4, edit distance, exact match (and, with
--render, Deng et al.'s rendered-image exact match and image edit distance).

    python evaluate.py --split test --data_path DIR --model_path M
    python evaluate.py --images ../shared/data/im2latex100k/val_images \\
        --matching ../shared/data/im2latex100k/val.matching.txt \\
        --formulas ../shared/data/im2latex100k/val.formulas.norm.txt --no_normalize

--images folders are read as inference.py reads them (normalized to the training look);
--no_normalize feeds images already in the dataset look as they are.

The reference and result files are aligned line by line, one line per image, in the order of
the split file: line i of --result_path is the prediction for line i of --ref_path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.files import atomic_write
from data.image import ImageError, read_user_readings
from data.layout import FORMULAS_FILE, read_lines, read_matching, read_split
from data.metrics import folded_scores, image_scores, text_scores
from data.vocab import VocabError
from im2latex.api import Reader
from model.checkpoint import DEFAULT_MODEL, CheckpointError

# Scoring lets a reading run past the decoding cap (im2latex.decoding.MAX_LEN, what the page
# and inference.py use): the test split is not length-filtered (data/build.py keeps it whole)
# and --formulas may be any reference file, so a reference may be longer than the formulas
# trained on, and a reading cut at the cap would be scored as a truncation, not as read.
EVAL_MAX_LEN = 250


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_path", default=str(DEFAULT_MODEL), help="checkpoint (.pt) or run dir")
    p.add_argument("--data_path", help="dataset folder in the IM2LATEX-100K layout")
    p.add_argument("--split", default="test", choices=["train", "validate", "test"])
    p.add_argument("--images", help="a folder of images (instead of --data_path), normalized "
                                    "as inference.py does")
    p.add_argument("--no_normalize", action="store_true",
                   help="with --images: feed them as they are (already in the dataset look)")
    p.add_argument("--matching", help="with --images: lines 'IMAGE FORMULA_INDEX'")
    p.add_argument("--formulas", help="with --images: the formula file the indices point into")
    p.add_argument("--beam_size", type=int, default=5, help="1: greedy decoding")
    p.add_argument("--max_len", type=int, default=EVAL_MAX_LEN,
                   help="longest prediction, in tokens")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="score only the first N images")
    p.add_argument("--ref_path", default="results/ref.txt")
    p.add_argument("--result_path", default="results/result.txt")
    p.add_argument("--metrics_path", help="also write the scores as JSON here")
    p.add_argument("--render", action="store_true",
                   help="also score rendered images (Deng et al.'s image metrics)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def labelled_entries(args: argparse.Namespace):
    if args.images:
        if not (args.matching and args.formulas):
            raise SystemExit("error: --images needs --matching and --formulas")
        for f in (args.images, args.matching, args.formulas):
            if not Path(f).exists():
                raise SystemExit(f"error: {f} not found")
        return read_matching(args.matching, args.images, read_lines(args.formulas))
    if not args.data_path:
        raise SystemExit("error: give --data_path DIR (with --split) or --images/--matching/"
                         "--formulas")
    if not (Path(args.data_path) / FORMULAS_FILE).is_file():
        raise SystemExit(f"error: {Path(args.data_path) / FORMULAS_FILE} not found: "
                         "not a dataset folder")
    return read_split(args.data_path, args.split)


def image_pipeline(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to normalize the images, and a line saying so.

    A built dataset (--data_path) is already in the training look (preprocess.py renders it,
    jerry_preprocess.py normalizes user images while building), so only --images folders are
    normalized; scoring them as they are made the same model read light-on-dark scans at a
    fraction of its inference.py accuracy."""
    if args.images and not args.no_normalize:
        return True, ("normalized as inference.py does (inverted if light on dark, cropped, "
                      "rescaled to the training font size); --no_normalize feeds them as they are")
    why = "--no_normalize" if args.images else "a built dataset is in the training look already"
    return False, f"fed as they are ({why})"


def read_entries(entries: list, normalize_them: bool, problems: list[str]
                 ) -> tuple[list[tuple[np.ndarray, ...]], list[str]]:
    """(model inputs, references) through the reader inference.py uses, one image path for
    both; an image that cannot be read is reported and left out."""
    images, refs = [], []
    for e in entries:
        try:
            images.append(read_user_readings(e.image, normalize=normalize_them))
        except (ImageError, OSError) as err:
            problems.append(f"{e.source}: {err}")
            continue
        refs.append(e.formula)
    return images, refs


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    entries, problems = labelled_entries(args)
    if args.limit:
        entries = entries[:args.limit]
    normalize_them, pipeline = image_pipeline(args)
    print(f"images: {pipeline}", file=sys.stderr)
    images, refs = read_entries(entries, normalize_them, problems)
    for msg in problems[:20]:
        print(f"warning: {msg}", file=sys.stderr)
    if problems:
        print(f"warning: {len(problems)} lines skipped", file=sys.stderr)
    if not images:
        print("error: no images to evaluate", file=sys.stderr)
        return 1

    reader = Reader(args.model_path, beam_size=args.beam_size, device=args.device,
                    batch_size=args.batch_size, max_len=args.max_len, normalize=normalize_them)
    unknown = sum(bool(reader.vocab.unknown(r)) for r in refs)
    if unknown:
        print(f"note: {unknown} of {len(refs)} references hold tokens outside the model's "
              "vocabulary; those cannot be matched exactly", file=sys.stderr)
    bar = tqdm(total=sum(map(len, images)), desc="decoding", unit="img", disable=args.quiet)
    preds = reader.decode(images, on_batch=bar.update)
    bar.close()
    hyps = [p.latex for p in preds]

    for path, lines in ((args.ref_path, refs), (args.result_path, hyps)):
        atomic_write(path, "".join(line + "\n" for line in lines))

    scores = {**text_scores(refs, hyps), **folded_scores(refs, hyps)}
    print(f"images: {len(refs)}")
    print(f"BLEU-4: {scores['bleu4']:.2f}")
    print(f"Edit distance: {scores['edit_distance']:.2f}")
    print(f"Exact match: {scores['exact_match']:.2f}")
    print(f"Font spelling folded (data/spelling.py): BLEU-4 {scores['bleu4_folded']:.2f}, "
          f"exact match {scores['exact_match_folded']:.2f}")
    if args.render:
        from data.normalize import detokenize
        from data.render import render_formulas

        ref_imgs = render_formulas([detokenize(r) for r in refs], progress=not args.quiet)
        hyp_imgs = render_formulas([detokenize(h) for h in hyps], progress=not args.quiet)
        scores.update(image_scores(ref_imgs, hyp_imgs))
        print(f"Image exact match: {scores['image_exact_match']:.2f}")
        print(f"Image edit distance: {scores['image_edit_distance']:.2f}")
    if args.metrics_path:
        scores.update(images=len(refs), beam_size=args.beam_size, normalized=normalize_them,
                      model_path=str(args.model_path), mean_score=float(np.mean(
                          [p.score for p in preds])))
        atomic_write(args.metrics_path, json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (VocabError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
