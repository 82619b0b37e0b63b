"""Fuzz the user-image path (load_image, normalize_user_image, model_input) with hostile images.

    python bench/fuzz_images.py [--n 300] [--seed 0] [--max_seconds 5] [--max_rss_mb 1500]

Every image must either become a valid model input (uint8, within the largest bucket, at least
the encoder's minimum size) or raise ImageError, each within --max_seconds, and the process's
peak resident memory must stay under --max_rss_mb. Kinds: noise of many densities and sizes,
dot grids, lines, extreme aspect ratios, 1x1, all black, all white, palette / alpha / 16-bit /
1-bit modes, GIF and JPEG, 6-16 Mpx noise (gray or RGBA), truncated files and PNG headers that
claim a decompression bomb.
Prints one summary line (and one line per failure); exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import io
import resource
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.image import (  # noqa: E402
    BUCKETS,
    MIN_HEIGHT,
    MIN_WIDTH,
    ImageError,
    read_user_image,
)

Rng = np.random.Generator


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _gray(a: np.ndarray) -> bytes:
    return _encode(Image.fromarray(a.astype(np.uint8)))


def _side(rng: Rng, top: int = 4000) -> int:
    return int(np.exp(rng.uniform(0, np.log(top))))  # log-uniform: as many tiny as huge


def noise(rng: Rng) -> bytes:
    h, w, density = _side(rng), _side(rng), rng.choice([0.001, 0.01, 0.1, 0.5, 0.9])
    return _gray(np.where(rng.random((h, w), np.float32) < density, 0, 255))


def gray_noise(rng: Rng) -> bytes:
    return _gray(rng.integers(0, 256, (_side(rng, 3000), _side(rng, 3000)), dtype=np.uint8))


def dot_grid(rng: Rng) -> bytes:
    n, step = _side(rng, 3000), int(rng.integers(2, 12))
    img = np.full((n, n), 255, np.uint8)
    img[::step, ::step] = 0
    return _gray(img)


def lines(rng: Rng) -> bytes:
    img = np.full((_side(rng, 3000), _side(rng, 3000)), 255, np.uint8)
    step = int(rng.integers(2, 40))
    img[::step] = 0
    if rng.random() < 0.5:
        img[:, ::step] = 0
    return _gray(img)


def aspect(rng: Rng) -> bytes:
    long, short = int(rng.integers(1000, 40000)), int(rng.integers(1, 200))
    img = np.full((short, long), 255, np.uint8)
    img[short // 3: max(short // 3 + 1, 2 * short // 3), ::int(rng.integers(2, 60))] = 0
    return _gray(img if rng.random() < 0.5 else img.T)


def tiny_or_flat(rng: Rng) -> bytes:
    h, w = [(1, 1), (2, 3), (_side(rng), _side(rng))][int(rng.integers(3))]
    return _gray(np.full((h, w), rng.choice([0, 128, 255]), np.uint8))


def modes(rng: Rng) -> bytes:
    a = np.where(rng.random((_side(rng, 2000), _side(rng, 2000))) < 0.3, 0, 255).astype(np.uint8)
    mode = rng.choice(["P", "LA", "RGBA", "I;16", "1", "GIF", "JPEG"])
    im = Image.fromarray(a)
    if mode == "I;16":
        return _encode(Image.fromarray(a.astype(np.uint16) * 257))
    if mode in ("LA", "RGBA"):
        im = im.convert(mode)
        im.putalpha(Image.fromarray(rng.integers(0, 256, a.shape, dtype=np.uint8)))
        return _encode(im)
    if mode in ("GIF", "JPEG"):
        return _encode(im, mode)
    return _encode(im.convert(mode))


def big(rng: Rng) -> bytes:
    """Near MAX_PIXELS' order of magnitude (16 Mpx): the sizes the old code choked on."""
    n = int(rng.integers(2400, 4001))
    a = np.where(rng.random((n, n), np.float32) < rng.choice([0.01, 0.5]), 0, 255)
    im = Image.fromarray(a.astype(np.uint8))
    return _encode(im.convert("RGBA") if rng.random() < 0.3 else im)


def truncated(rng: Rng) -> bytes:
    data = dot_grid(rng)
    return data[: int(rng.integers(1, len(data)))]


def bomb_header(rng: Rng) -> bytes:
    """A valid PNG whose IHDR claims up to 2^31 px a side (correct CRC, tiny data)."""
    w, h = (int(rng.integers(1, 2**31)) for _ in range(2))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    body = zlib.compress(b"\0" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


KINDS: list[Callable[[Rng], bytes]] = [noise, gray_noise, dot_grid, lines, aspect,
                                       tiny_or_flat, modes, big, truncated, bomb_header]


def check(data: bytes) -> str:
    """'valid' or 'refused'; raises AssertionError for an invalid model input."""
    try:
        img = read_user_image(data, name="fuzz")
    except ImageError:
        return "refused"
    largest_w, largest_h = BUCKETS[-1]
    assert img.dtype == np.uint8, img.dtype
    assert MIN_HEIGHT <= img.shape[0] <= largest_h and MIN_WIDTH <= img.shape[1] <= largest_w, \
        img.shape
    return "valid"


def fuzz(n: int, seed: int = 0, max_seconds: float = 5.0, max_rss_mb: float = 1500.0
         ) -> tuple[str, list[str]]:
    """(summary line, failures) of `n` hostile images, each kind in turn."""
    rng = np.random.default_rng(seed)
    counts = {"valid": 0, "refused": 0}
    failures: list[str] = []
    slowest = (0.0, "")
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        data = kind(rng)
        t = time.perf_counter()
        try:
            counts[check(data)] += 1
        except Exception as e:  # anything but ImageError is a failure to report, not to crash
            failures.append(f"#{i} {kind.__name__}: {e.__class__.__name__}: {e}")
        dt = time.perf_counter() - t
        slowest = max(slowest, (dt, f"#{i} {kind.__name__}"))
        if dt > max_seconds:
            failures.append(f"#{i} {kind.__name__}: {dt:.1f} s (limit {max_seconds})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rss > max_rss_mb:
        failures.append(f"peak RSS {rss:.0f} MB (limit {max_rss_mb:.0f})")
    summary = (f"fuzz_images: {n} images (seed {seed}), {counts['valid']} valid model inputs, "
               f"{counts['refused']} refused with ImageError, {len(failures)} failures; slowest "
               f"{slowest[0]:.2f} s ({slowest[1]}), peak RSS {rss:.0f} MB")
    return summary, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_seconds", type=float, default=5.0, help="per image")
    p.add_argument("--max_rss_mb", type=float, default=1500.0, help="peak of the process")
    args = p.parse_args(argv)
    summary, failures = fuzz(args.n, args.seed, args.max_seconds, args.max_rss_mb)
    for f in failures:
        print(f"FAIL {f}")
    print(summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
