"""`launch.guard` kills what a dead driver left, also when its log cannot be written: the log lives on the run's
disk, and a full disk is one of the faults the guard is there for (its log set to /dev/full, where every write fails
with ENOSPC). A real guard process, a real driver and a real child; about 2 s."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from launch.guard import RUN_MARK

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""
"""A stand-in driver: it starts a child (a Ray process, for the guard) and ends without stopping it."""


def _guarded_child_after_the_driver_ends(log, ray_logs: Path) -> psutil.Process:
    mark = f"test-guard-{os.getpid()}-{time.time_ns()}"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, "1.5"], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, **{RUN_MARK: mark}))
    guard = subprocess.Popen([sys.executable, "-m", "launch.guard", str(driver.pid), mark, str(ray_logs)],
                             cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    child = psutil.Process(int(driver.stdout.readline()))
    driver.wait(30)
    guard.wait(30)
    return child


def test_the_guard_kills_a_dead_drivers_processes_though_its_log_disk_is_full(tmp_path):
    with open("/dev/full", "w") as full:
        child = _guarded_child_after_the_driver_ends(full, tmp_path / "ray")
    try:
        deadline = time.time() + 5
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), f"the guard died writing its log: pid {child.pid} of the dead driver still runs"
    finally:
        if _alive(child):
            child.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
