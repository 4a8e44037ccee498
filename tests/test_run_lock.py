"""One run per run directory: a second driver is refused in one line naming the directory and the holder's pid,
and a lock left by a killed driver is taken over with a note. The slow test starts two real runs of one directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.runlock import LOCK_NAME, hold_run_lock, release_run_lock
from spec.errors import LongtrainError

HOLDER = ("import sys, time; from launch.runlock import hold_run_lock; hold_run_lock(sys.argv[1]); "
          "print('held', flush=True); time.sleep(120)")


def _holder(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_held_directory_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(LongtrainError, match=f"run directory {tmp_path} is in use by another longtrain run "
                                                 f"\\(pid {holder.pid} on "):
            hold_run_lock(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the killed one
    notes = []
    hold_run_lock(tmp_path, note=notes.append)
    try:
        assert len(notes) == 1 and f"left by pid {holder.pid}" in notes[0] and "no longer holds it" in notes[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # a normal end leaves nothing behind


def test_a_lock_released_normally_is_taken_without_a_note(tmp_path):
    subprocess.run([sys.executable, "-c", "import sys; from launch.runlock import hold_run_lock; "
                    "hold_run_lock(sys.argv[1])", str(tmp_path)], check=True)
    assert not (tmp_path / LOCK_NAME).exists()
    notes = []
    hold_run_lock(tmp_path, note=notes.append)
    release_run_lock(tmp_path)
    assert notes == []


@pytest.mark.slow
def test_two_runs_of_one_directory(tmp_path):
    """The second `longtrain train` of a directory a running one holds is refused in one line, before it writes
    anything there; the first run is not disturbed."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launch.cli", "train", f"run.dir={run_dir}", "train.max_steps=40",
               "checkpoint.every_steps=0", "data.seq_len=128", "data.micro_batch_size=2", "train.log_every_steps=20"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "config.yaml").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.2)
        second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        err = second.stderr.strip().splitlines()
        print("\n".join(err))
        assert second.returncode == 2 and len(err) == 1
        assert f"run directory {run_dir} is in use by another longtrain run (pid {first.pid} on" in err[0]
        assert list(run_dir.glob("config*.yaml")) == [run_dir / "config.yaml"]  # the second wrote no config copy
        out, err_first = first.communicate(timeout=300)
        assert first.returncode == 0, err_first[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (run_dir / LOCK_NAME).exists()
