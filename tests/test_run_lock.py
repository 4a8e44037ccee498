"""One run per run directory: a second driver is refused in one line naming the directory and the holder's pid,
and a lock left by a killed driver is taken over with a note. Two real runs of one directory:
tests/test_ray_loopback.py (watched while its run runs)."""

import json
import os
import signal
import subprocess
import sys
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
