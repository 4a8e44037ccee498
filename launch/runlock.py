"""One run at a time in a run directory: a lock the driver holds for the run's life.

Why: two `longtrain train` of one directory (two `resume=auto` of the same name) each resumed from the same tag and
wrote the next one together; it was marked complete with ranks from different steps. The driver now takes an
exclusive `flock` on `RUN_DIR/.lock` (its pid, host and start time written inside) before it writes anything there
and holds it until the run ends (`release_run_lock`; at exit at the latest). The kernel drops a flock however the process ends, even on SIGKILL, so a lock left by
a dead driver never blocks: its file stays behind and the next run takes it over with a note naming the dead pid.
While the holder lives, a second run is refused in one line naming the directory and the holder's pid. Linux
emulates flock on NFS with POSIX locks, so this holds on the shared storage a cluster's run directories live on.
"""

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict

from spec.errors import LongtrainError

LOCK_NAME = ".lock"
_held: Dict[Path, int] = {}
"""Run directories this process holds, and the open lock file of each (the lock lives as long as it is open)."""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def hold_run_lock(run_dir: Path, note: Callable[[str], None] = _to_stderr) -> None:
    """Lock `run_dir` for this process until `release_run_lock` or exit (again from the same process: nothing to
    do)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    fd = _locked_fd(run_dir / LOCK_NAME, run_dir)
    previous = _holder(fd)
    if previous:
        note(f"longtrain: note: took over the lock of {run_dir} left by pid {previous.get('pid')} on "
             f"{previous.get('host')}, which no longer holds it (it ended without releasing it: killed or crashed)")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _held[run_dir] = fd
    atexit.register(release_run_lock, run_dir)


def release_run_lock(run_dir: Path) -> None:
    """Remove the lock file, then let go (a run that ends normally leaves nothing behind)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is None:
        return
    try:
        (Path(run_dir).resolve() / LOCK_NAME).unlink()
    except OSError:
        pass
    os.close(fd)


def _locked_fd(path: Path, run_dir: Path) -> int:
    """An open, locked lock file that is still the one at `path` (a releasing holder may unlink it between our
    open and our lock: then the file we locked is gone, and the new one is tried)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LongtrainError(f"run directory {run_dir} is in use by another longtrain run (pid "
                                 f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                                 f"{holder.get('since', '?')}); wait for it to end or stop it, or start a new run "
                                 "without resume= (or with another run.dir)") from None
        try:
            if os.fstat(fd).st_ino == path.stat().st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(fd: int) -> dict:
    """What the lock file says about the process that wrote it ({} when empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        found = json.loads(text) if text.strip() else {}
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}
