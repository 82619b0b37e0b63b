"""data.files: atomic writes keep the old file on failure, leave no temporary file, do not
collide, and what a killed writer left is removed by the next run."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data.files import atomic_open, atomic_write, remove_stale_temps, temp_owner, temp_path

ROOT = Path(__file__).resolve().parents[1]


def test_a_writer_failing_midway_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "vocab.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_open(target) as f:
            f.write(b"new, half of it")
            raise RuntimeError("midway")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]


def test_writes_str_and_bytes_and_leaves_only_the_target(tmp_path):
    atomic_write(tmp_path / "sub" / "a.txt", "é\n")  # missing folders are made
    atomic_write(tmp_path / "sub" / "a.txt", "ü\n")
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "ü\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.bin", "sub"]


def test_sync_is_the_default_and_can_be_skipped(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    atomic_write(tmp_path / "a", b"1")
    with atomic_open(tmp_path / "b", sync=False) as f:
        f.write(b"2")
    assert len(synced) == 1 and (tmp_path / "b").read_bytes() == b"2"


def test_concurrent_writers_of_one_file_do_not_collide(tmp_path):
    """Eight threads (one PID) hold their temporary files open at once; the result is one
    writer's whole content."""
    target, n = tmp_path / "shared.bin", 8
    barrier, errors = threading.Barrier(n, timeout=10), []

    def write(i: int) -> None:
        try:
            with atomic_open(target) as f:
                f.write(bytes([i]) * 1000)
                barrier.wait()  # every temporary file exists now
                f.write(bytes([i]) * 1000)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = target.read_bytes()
    assert len(data) == 2000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_temp_names_hold_the_pid_and_differ():
    a, b = temp_path(Path("d/x.pt")), temp_path(Path("d/x.pt"))
    assert a != b and a.parent == Path("d") and a.name.startswith(".x.pt.")
    assert temp_owner(a) == os.getpid()
    assert temp_owner(Path(".last.pt.123.tmp")) == 123  # the checkpoint's older form
    for other in (".notes.tmp", "x.1.tmp", ".x.png.abc123.tmp", ".x.png.12.tmpx"):
        assert temp_owner(Path(other)) is None, other


def test_the_temp_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    """A writer SIGKILLed mid-write leaves its temporary file; the next run removes it, but
    not the one of a writer still running, nor files not named like ours."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
            "from data.files import atomic_open\n"
            "with atomic_open(sys.argv[2]) as f:\n"
            "    f.write(b'half'); f.flush(); print('writing', flush=True); time.sleep(60)\n")

    def writer(name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path / name)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"
        return proc

    killed, live = writer("killed.npy"), writer("live.npy")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (stale,) = tmp_path.glob(".killed.npy.*.tmp")
        (running,) = tmp_path.glob(".live.npy.*.tmp")
        unrelated = [tmp_path / ".notes.tmp", tmp_path / "x.1.tmp"]
        for p in unrelated:
            p.write_bytes(b"")
        assert remove_stale_temps(tmp_path) == [stale]
        assert not stale.exists() and running.exists() and all(p.exists() for p in unrelated)
    finally:
        live.kill()
        live.wait()
        live.stdout.close()
        killed.stdout.close()
    assert not (tmp_path / "killed.npy").exists()
