"""Nothing of a local run outlives its driver: a small watcher process ends every process the run started.

Why a separate process: a killed driver (SIGKILL, the OOM killer, a closed terminal) runs no cleanup code. Ray's
own fate sharing ends the GCS and the raylet with the driver, and the workers notice their raylet's death in a few
seconds, but the dashboard and runtime-env agents then wait up to a minute trying to report the raylet's death to
the dead GCS (Ray 2.60), and a double Ctrl-C leaves no time for `ray.shutdown`. The guard, started in its own
session (a Ctrl-C to the terminal's process group does not reach it), polls the driver and remembers every process
below it (the GCS, the raylet, the agents and the workers the raylet starts); once the driver is gone it kills
those still running. The driver also marks its environment with a run id before it starts Ray, which every process
of the local cluster inherits, for one started between two polls; the mark alone is not enough, as Ray's long
process titles (`ray::DashboardAgent`) overwrite the memory /proc reads the environment from.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict

import psutil

RUN_MARK = "LONGTRAIN_RUN_ID"
POLL_SECONDS = 0.5
KILL_ROUNDS_SECONDS = 10.0


def start_guard(log_file: Path) -> None:
    """Mark this process's environment (before Ray starts) and start the guard for it."""
    mark = uuid.uuid4().hex
    os.environ[RUN_MARK] = mark
    with open(log_file, "a") as log:
        subprocess.Popen([sys.executable, "-m", "launch.guard", str(os.getpid()), mark, str(log_file.parent / "ray")],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)


def watch(driver_pid: int, mark: str, ray_logs: Path) -> None:
    """Wait for the driver to end, then kill the marked processes until none is left (or 10 s have passed). Then
    remove the temp dir of a local head the driver did not stop itself (it died, or left at once after a Ctrl-C),
    its Ray session logs copied to `ray_logs` (the run's logs/ray): that run did not finish."""
    from launch.local_head import remove_temp_dir, temp_dirs_of_run

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known = _watch_tree(driver_pid)
    deadline = time.time() + KILL_ROUNDS_SECONDS
    while time.time() < deadline:
        left = [p for p in known.values() if _alive(p)] + [p for p in marked_processes(mark) if p.pid not in known]
        if not left:
            for temp_dir in temp_dirs_of_run(mark):
                remove_temp_dir(temp_dir, ray_logs)
            return
        for process in left:
            name = _name(process)
            _kill(process)
            _log(f"guard: driver {driver_pid} has ended; killed {process.pid} ({name})")
        psutil.wait_procs(left, timeout=POLL_SECONDS)


def _watch_tree(pid: int) -> Dict[int, psutil.Process]:
    """Every process seen below the driver until the driver ends (a psutil.Process knows its start time, so a
    reused pid is not mistaken for it)."""
    known: Dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(pid)
        while _alive(driver):
            known.update((child.pid, child) for child in driver.children(recursive=True) if child.pid not in known)
            time.sleep(POLL_SECONDS)
    except psutil.NoSuchProcess:
        pass
    known.pop(os.getpid(), None)
    return known


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a killed process its parent has not reaped yet is gone for our purpose)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def marked_processes(mark: str) -> list:
    """Live processes (but this one) whose environment carries the run's mark."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(RUN_MARK) == mark and _alive(process):
                found.append(process)
        except (psutil.Error, OSError):  # gone meanwhile, or another user's
            continue
    return found


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.Error:
        pass


def _log(line: str) -> None:
    """A line to the guard's log, which lives on the run's disk: a full disk (ENOSPC) or a log that went away must
    not end the guard, whose job is the killing, not the record of it."""
    try:
        print(line, flush=True)
    except OSError:
        pass


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
