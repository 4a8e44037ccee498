"""Nothing of a local run outlives its driver: a small watcher process ends every process the run started.

Why a separate process: a killed driver (SIGKILL, the OOM killer, a closed terminal) runs no cleanup code. Ray's
own fate sharing ends the GCS and the raylet with the driver, and the workers notice their raylet's death in a few
seconds, but the dashboard and runtime-env agents then wait up to a minute trying to report the raylet's death to
the dead GCS (Ray 2.60), and a double Ctrl-C leaves no time for `ray.shutdown`. The driver marks its environment
with a run id before it starts Ray, so every process of the local cluster inherits it (Ray's workers are forked
from the raylet with its environment); the guard, started in its own session (a Ctrl-C to the terminal's process
group does not reach it), polls the driver and, once it is gone, kills each process that carries the mark.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

RUN_MARK = "LONGTRAIN_RUN_ID"
POLL_SECONDS = 0.5
KILL_ROUNDS_SECONDS = 10.0


def start_guard(log_file: Path) -> None:
    """Mark this process's environment (before Ray starts) and start the guard for it."""
    mark = uuid.uuid4().hex
    os.environ[RUN_MARK] = mark
    with open(log_file, "a") as log:
        subprocess.Popen([sys.executable, "-m", "launch.guard", str(os.getpid()), mark], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True)


def watch(driver_pid: int, mark: str) -> None:
    """Wait for the driver to end, then kill the marked processes until none is left (or 10 s have passed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_end(driver_pid)
    deadline = time.time() + KILL_ROUNDS_SECONDS
    while time.time() < deadline:
        left = marked_processes(mark)
        if not left:
            return
        for process in left:
            print(f"guard: driver {driver_pid} is gone; killing {process.pid} ({_name(process)})", flush=True)
            _kill(process)
        psutil.wait_procs(left, timeout=POLL_SECONDS)


def _wait_for_end(pid: int) -> None:
    try:
        driver = psutil.Process(pid)
        while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:  # a killed, unreaped driver: gone
            time.sleep(POLL_SECONDS)
    except psutil.NoSuchProcess:
        pass


def marked_processes(mark: str) -> list:
    """Live processes (but this one) whose environment carries the run's mark."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(RUN_MARK) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):  # gone meanwhile, or another user's
            continue
    return found


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.Error:
        pass


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
