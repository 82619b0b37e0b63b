"""How well is a user image's glyph scale estimated? Validation renders at known scales.

Each validation formula is made at known factors of the training scale in several looks:
``render`` (rendered at 200 x factor dpi, a sharp anti-aliased screenshot), ``upscaled`` (the
training render enlarged with LANCZOS, a zoomed screenshot), ``thin`` (rendered at 4x and
quartered: lighter strokes), ``gray`` (gray ink on gray paper) and ``dark`` (light on dark,
read back through load_image). For each look and factor it prints the distribution of the
estimated / true scale: median |log error|, its 90th percentile and the share within 10%,
for the legacy estimate (glyph_size / REFERENCE_GLYPH_SIZE) and data.glyph_scale's.

    python bench/scale_estimate.py                    # estimate errors, 300 formulas
    python bench/scale_estimate.py --e2e 150          # plus greedy BLEU through normalization
    python bench/scale_estimate.py --calibrate        # rebuild data/glyph_scale_template.npy

Calibration uses validation formulas [0, n), evaluation [offset, offset + n): disjoint.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import glyph_scale, image  # noqa: E402
from data.files import atomic_open  # noqa: E402

FACTORS = (1.0, 1.3, 1.7, 2.2, 3.0, 4.0)
LOOKS = {"render": FACTORS, "upscaled": FACTORS, "thin": (1.0, 2.2), "gray": (1.3, 3.0),
         "dark": (1.3, 3.0)}


# The legacy pass-through range: glyph_size within (7, 13) px, over REFERENCE_GLYPH_SIZE.
LEGACY_RANGE = (7.0 / 9.0, 13.0 / 9.0)


def legacy_scale(glyphs: np.ndarray) -> float:
    """The estimate before data.glyph_scale: one statistic of the boxes over the reference."""
    return image.glyph_size(glyphs) / image.REFERENCE_GLYPH_SIZE


def read_formulas(data: Path, start: int, n: int) -> list[str]:
    path = data / "im2latex100k" / "val.formulas.norm.txt"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    return lines[start:start + n]


def renders(formulas: list[str], dpi: int, down: int) -> list[np.ndarray | None]:
    from data.render import RenderOptions, render_formulas

    return render_formulas(formulas, RenderOptions(dpi=dpi, downsample=down))


def resize(img: np.ndarray, s: float) -> np.ndarray:
    h, w = img.shape
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)),
                                                  Image.Resampling.LANCZOS))


def make_look(look: str, s: float, formulas: list[str], base: list) -> list[np.ndarray | None]:
    """The images of one look at factor s (None where the formula did not render)."""
    if look == "upscaled":
        return [None if b is None else resize(b, s) for b in base]
    if look == "thin":
        return renders(formulas, round(400 * s), 4)
    imgs = base if s == 1.0 else renders(formulas, round(200 * s), 2)
    if look == "gray":
        return [None if i is None else (60 + i.astype(np.float64) * (140 / 255)).astype(np.uint8)
                for i in imgs]
    if look == "dark":
        out = []
        for i in imgs:
            if i is not None:
                buf = io.BytesIO()
                Image.fromarray(255 - i).save(buf, format="PNG")
                i = image.load_image(buf.getvalue())
            out.append(i)
        return out
    return imgs


def true_scale(img: np.ndarray, s: float) -> float:
    """s in the analysis image's pixels (large images are shrunk before the analysis)."""
    return s * min(1.0, image._ANALYSIS_SIDE / max(img.shape))


def errors(imgs: list, s: float, estimators: dict[str, Callable]) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {k: [] for k in estimators}
    for img in imgs:
        if img is None:
            continue
        glyphs = image.analyse(img)[3]
        for name, fn in estimators.items():
            out[name].append(np.log(fn(glyphs) / true_scale(img, s)))
    return {k: np.array(v) for k, v in out.items()}


def summary(err: np.ndarray) -> str:
    a = np.abs(err)
    return (f"{np.exp(np.median(err)):5.2f} {np.median(a):6.3f} {np.percentile(a, 90):6.3f} "
            f"{100 * np.mean(a < np.log(1.1)):5.1f}%")


def report(formulas: list[str], base: list) -> None:
    estimators = {"legacy": legacy_scale, "glyph_scale": image.estimate_scale}
    print(f"{len(formulas)} validation formulas; per estimator: median ratio, median |log err|,"
          " p90 |log err|, share within 10%")
    print(f"{'look':9} {'factor':>6}  " + "  ".join(f"{k:^28}" for k in estimators))
    pooled: dict[str, list] = {k: [] for k in estimators}
    for look, factors in LOOKS.items():
        for s in factors:
            err = errors(make_look(look, s, formulas, base), s, estimators)
            for k in estimators:
                pooled[k].append(err[k])
            print(f"{look:9} {s:6.1f}  " + "  ".join(f"{summary(err[k]):28}" for k in estimators),
                  flush=True)
    print(f"{'all':16}  " + "  ".join(f"{summary(np.concatenate(pooled[k])):28}"
                                      for k in estimators))


def calibrate(formulas: list[str], base: list) -> None:
    """Template from the 'render' and 'upscaled' looks at every factor (so integer pixel sizes
    at one scale do not make it spiky), written where data.glyph_scale loads it."""
    pairs = []
    for look in ("render", "upscaled"):
        for s in FACTORS:
            for img in make_look(look, s, formulas, base):
                if img is not None:
                    pairs.append((image.analyse(img)[3], true_scale(img, s)))
    with atomic_open(glyph_scale.TEMPLATE_PATH) as f:  # the estimate every user image takes
        np.save(f, glyph_scale.build_template(pairs))
    print(f"wrote {glyph_scale.TEMPLATE_PATH} from {len(pairs)} images")


def end_to_end(formulas: list[str], n: int) -> None:
    """Greedy BLEU-4 / exact of the shipped model through normalize_user_image, legacy
    estimate against glyph_scale, on 'render' images at factors 1, 2 and 3."""
    from data.metrics import text_scores
    from model.checkpoint import load_model
    from model.predict import predict

    model, vocab = load_model(ROOT / "checkpoints" / "im2latex.pt")
    formulas = formulas[:n]
    new = image.estimate_scale
    for s in (1.0, 2.0, 3.0):
        imgs = renders(formulas, round(200 * s), 2)
        keep = [i for i, img in enumerate(imgs) if img is not None]
        row = []
        for name, fn, span in (("legacy", legacy_scale, LEGACY_RANGE),
                               ("glyph_scale", new, image.TRAINING_SCALE_RANGE)):
            # the seams normalize_user_image estimates through: the legacy arm is the old code
            saved = image.TRAINING_SCALE_RANGE
            image.estimate_scale, image.TRAINING_SCALE_RANGE = fn, span
            try:
                normed = [image.model_input(image.normalize_user_image(imgs[i])) for i in keep]
            finally:
                image.estimate_scale, image.TRAINING_SCALE_RANGE = new, saved
            hyps = [p.latex for p in predict(model, vocab, normed, beam_size=1)]
            sc = text_scores([formulas[i] for i in keep], hyps)
            row.append(f"{name}: BLEU-4 {sc['bleu4']:5.1f} exact {sc['exact_match']:5.1f}%")
        print(f"factor {s:.1f} ({len(keep)} images)  " + "   ".join(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--n", type=int, default=300, help="validation formulas")
    p.add_argument("--offset", type=int, default=300, help="first evaluation formula")
    p.add_argument("--calibrate", action="store_true", help="rebuild the template on [0, n)")
    p.add_argument("--e2e", type=int, default=0, help="formulas for the end-to-end check")
    args = p.parse_args()
    if args.n < 1:
        raise SystemExit("error: --n must be positive")
    start = time.time()
    formulas = read_formulas(args.data, 0 if args.calibrate else args.offset, args.n)
    base = renders(formulas, 200, 2)
    if args.calibrate:
        calibrate(formulas, base)
        return
    report(formulas, base)
    if args.e2e:
        end_to_end(formulas, args.e2e)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
