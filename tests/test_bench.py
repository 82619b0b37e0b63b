"""The speed benchmarks run end to end (on toy sizes) and print their summary line last."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = ["--batch", "2", "--steps", "1", "--warmup", "0", "--height", "32", "--width", "64",
        "--threads", "1"]


@pytest.mark.parametrize("script, extra, summary", [
    ("bench/train_speed.py", ["--tgt_len", "5"],
     r"^train_speed: ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x$"),
    ("bench/decode_speed.py", ["--max_len", "5"],
     r"^decode_speed: beam5 ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x, peak RSS ours "
     r"\d+ MB; greedy ours [\d.]+ img/s, baseline [\d.]+ img/s, [\d.]+x"),
])
def test_bench_runs_both_sides(script, extra, summary):
    p = subprocess.run([sys.executable, str(ROOT / script), *TINY, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert re.match(summary, lines[-1]), lines[-1]
    assert any("baseline" in ln and "img/s" in ln for ln in lines[:-1])
    if script == "bench/train_speed.py":  # our step's arithmetic floor, below the measured time
        floor = next(ln for ln in lines if ln.strip().startswith("floor:"))
        assert re.search(r"tensor ops, 0 host syncs; measured [\d.]+ ms = [\d.]+x the floor$",
                         floor), floor
        assert float(floor.rsplit("= ", 1)[1].split("x")[0]) >= 1.0, floor


def test_loader_speed_times_each_worker_count():
    p = subprocess.run([sys.executable, str(ROOT / "bench/loader_speed.py"), "--synthetic", "400",
                        "--batches", "4", "--workers", "0", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"loader_speed: workers 0 \d+ img/s, workers 1 \d+ img/s", last), last
