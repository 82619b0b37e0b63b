"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch."""

import csv
import os
import re
import subprocess
import sys

import torch

from model.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY_MODEL, run_script

# With the encoder's batch norm, whose statistics model/batch_norm.py all-reduces on CPU. In
# fp32: with the bf16 encoder, two batch-norm kernels round activations to bf16 differently,
# and Adam turns those one-unit differences into ~lr-sized steps on the conv weights before a
# norm (their gradients are tiny: the norm makes the loss blind to their scale). The losses
# still agree to ~1e-4 then.
ARGS = [*TINY_MODEL, "--amp", "off", "--workers", "0", "--quiet", "--threads", "1",
        "--print_freq", "1", "--epoches", "3"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 or _torn_down_after_the_end(p), p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _torn_down_after_the_end(p: subprocess.CompletedProcess) -> bool:
    """gloo's process-group teardown can still abort a rank at exit on a loaded machine ("terminate
    called without an active exception"), after every rank passed the final barrier of
    train.Dist.finish. The run itself ended: its last line and its checkpoint come before that
    barrier, and the assertions on losses and weights below still judge it."""
    lines = p.stdout.strip().splitlines()
    ended = lines and re.match(r"(stopped at step \d+|epoch 3: train loss)", lines[-1])
    aborted = "terminate called without an active exception" in p.stderr
    return bool(ended) and aborted


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", stdout)]


def test_two_gloo_processes_match_one_process(tiny_dataset, tmp_path):
    single = run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "one",
                        *ARGS, "--batch_size", "8", "--max_steps", "4")
    multi = torchrun("--data_path", tiny_dataset, "--save_dir", tmp_path / "two", *ARGS,
                     "--batch_size", "4", "--max_steps", "4")
    assert "effective batch 8 (4 x 2)" in multi.stdout
    a, b = losses(single.stdout), losses(multi.stdout)
    assert len(a) == len(b) == 4
    assert all(abs(x - y) < 2e-4 for x, y in zip(a, b)), (a, b)  # printed to 4 decimals
    wa = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    # Adam divides by sqrt(v): where a gradient is ~0, float noise from the different summation
    # order (and convolution algorithms chosen per batch size) can flip a step's sign, and the
    # two runs then move that weight by ~lr (3e-4) in opposite directions: up to 2 lr a step.
    # The convolutions before a batch norm get many such flips (the norm makes their gradients
    # nearly orthogonal to them, so many components are ~0); in the decoder they must stay
    # rare. That the gradients themselves agree is tests/test_batch_norm.py's check.
    flipped, total = 0, 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=4 * 2 * 3e-4 + 1e-5)
        if k.startswith("decoder."):
            flipped += int(((wa[k] - wb[k]).abs() > 1e-5).sum())
            total += wa[k].numel()
    assert flipped < 0.05 * total, (flipped, total)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["last.pt"]  # rank 0 only


def test_distributed_resume(tiny_dataset, tmp_path):
    torchrun("--data_path", tiny_dataset, "--save_dir", tmp_path / "full", *ARGS,
             "--batch_size", "4", "--max_steps", "6", "--dropout", "0.3")
    torchrun("--data_path", tiny_dataset, "--save_dir", tmp_path / "part", *ARGS,
             "--batch_size", "4", "--max_steps", "3", "--dropout", "0.3")
    ckpt = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # both ranks' RNG states kept
    torchrun("--data_path", tiny_dataset, "--save_dir", tmp_path / "part", *ARGS,
             "--max_steps", "6", "--from_check_point")
    wa = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_whole_epoch_with_empty_slices_logs_what_one_process_logs(tiny_dataset, tmp_path):
    """Global batches of 6 over 2 ranks: a bucket's last batch of 1 image leaves one rank
    nothing, in training and in validation (which is sharded over the ranks too)."""
    run_script("train.py", "--data_path", tiny_dataset, "--save_dir", tmp_path / "one", *ARGS,
               "--batch_size", "6", "--epoches", "1")
    torchrun("--data_path", tiny_dataset, "--save_dir", tmp_path / "two", *ARGS,
             "--batch_size", "3", "--epoches", "1")
    one, two = ([row for row in csv.DictReader(open(tmp_path / run / "log.csv"))]
                for run in ("one", "two"))
    assert len(one) == len(two) == 1 and one[0]["step"] == two[0]["step"]
    # see above: Adam's flips add up over 21 steps; an argmax may flip on a near-tie
    for key, tol in (("train_loss", 1e-3), ("val_loss", 1e-3), ("val_acc", 0.01)):
        assert abs(float(one[0][key]) - float(two[0][key])) < tol, (key, one, two)
