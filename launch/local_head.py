"""A local run's private Ray head: `ray start --head` as a child of the driver, every port chosen by the OS.

Why not `ray.init(address="local")`: the head it starts has its dashboard agent's HTTP server on Ray's fixed port
52365, and `ray.init` has no argument to change it (Ray's answer, ray-project/ray#34886: `ray start` chooses it).
Two runs on one machine (or two test processes) then collide: the second agent fails to bind and runs without its
HTTP API. `ray start` takes 0 for that port, and for the worker ports (its default range 10002-19999 is another
fixed choice), so each server binds a free port itself (checked with `ss -ltnp` while two runs are alive: no port
shared). The head also gets a temp dir of its own, where Ray records the cluster's address (in the default
/tmp/ray, `ray.init()` and `address=auto` elsewhere on the machine would find this private cluster). It runs in its
own session: a Ctrl-C at the terminal reaches only the driver, which stops the run in order and then the head
(`stop`); a driver that dies without stopping it leaves the head to `launch.guard`, as the head is below the driver.
"""

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import psutil

from launch.guard import RUN_MARK
from spec.errors import LongtrainError

HEAD_ENV = {"AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
"""The head's monitor and dashboard processes serve Prometheus metrics on fixed ports (44217, 44227) that the first
two variables choose; 0: a free one (nothing of a local run scrapes them). On SIGTERM `ray start` drains the node
for up to 30 s first (for Ray Serve's proxies); a private run has nothing to drain: 0 ends it at once."""
START_TIMEOUT_SECONDS = 120.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT_SECONDS = 30.0
MARK_CHARS = 8


@dataclass
class LocalHead:
    process: subprocess.Popen
    temp_dir: Path
    address: str
    """The GCS address, `127.0.0.1:PORT`, for `ray.init(address=...)`."""

    def stop(self, keep_logs_in: Optional[Path] = None) -> None:
        """SIGTERM: `ray start --block` then ends its Ray processes itself (Ray's own shutdown); any left after 30 s
        are killed. Then the temp dir goes: each run left ~1 MB in /tmp/ray that nothing removed (`ray.init`'s
        sessions stay there too). Ray's session logs (raylet.err, the workers' .err files) are what a user reads
        after a failed run, so `keep_logs_in` (the run's logs/ray) gets a copy first; a finished run's summary is in
        its run directory and its Ray logs are not kept. If the copy fails (a full disk), the temp dir stays. Again
        (at exit): nothing to do."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:  # else ended and reaped: its pid may be another process's now
            self._end()
        remove_temp_dir(self.temp_dir, keep_logs_in)

    def _end(self) -> None:
        tree = _tree(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        kill_processes([process for process in tree if _alive(process)], timeout=10)
        if self.process.poll() is None:
            self.process.wait(10)


def remove_temp_dir(temp_dir: Path, keep_logs_in: Optional[Path]) -> None:
    """Remove a stopped head's temp dir, its Ray session logs copied to `keep_logs_in` first (when given); if the
    copy fails (a full disk), the temp dir stays, the logs' only copy."""
    if keep_logs_in is not None:
        try:
            shutil.copytree(temp_dir / "session_latest" / "logs", keep_logs_in, symlinks=True, dirs_exist_ok=True)
        except OSError:
            return
    shutil.rmtree(temp_dir, ignore_errors=True)


def temp_dirs_of_run(mark: str) -> List[Path]:
    """The temp dirs of the heads started under `launch.guard`'s run mark (named after it), for the guard to remove
    once it has killed what a dead driver left."""
    return sorted(Path(_ray_temp_root()).glob(f"lt-{mark[:MARK_CHARS]}-*"))


def kill_processes(processes: List[psutil.Process], timeout: float) -> None:
    """SIGKILL each (one already gone is skipped) and wait up to `timeout` seconds for them all."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=timeout)


def start_head(num_cpus: int) -> LocalHead:
    """Start the head on 127.0.0.1 and wait until it has recorded its address (one line naming its log and Ray's
    session logs if it does not start). Token authentication is on for the head and this process, as `ray.init`
    has it for a new local cluster (Ray's own calls: the token is where Ray looks, ~/.ray/auth_token unless
    RAY_AUTH_TOKEN says)."""
    from ray._private.authentication.authentication_token_setup import (enable_token_auth_by_default,
                                                                        ensure_token_if_auth_enabled)

    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    mark = os.environ.get(RUN_MARK, "")[:MARK_CHARS]  # the guard's: it finds this dir if the driver dies
    temp_dir = Path(tempfile.mkdtemp(prefix=f"lt-{mark}-", dir=_ray_temp_root()))  # short: Ray's socket paths below
    # it must fit AF_UNIX's 107 bytes
    log_file = temp_dir / "ray_start.log"  # here, not in the run directory: a run that did not start removes that
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--port=0", "--include-dashboard=false",
               "--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0",
               f"--ray-client-server-port={_free_port()}",  # `ray start` always starts one; its default: 10001
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               "--include-log-monitor=false"]  # it tails the workers' log files for drivers that print them; ours
    # does not (log_to_driver=False: a run's workers log to its run directory), and it cost ~1.5 CPU-seconds a run
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, env=dict(os.environ, **HEAD_ENV), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=log, start_new_session=True, close_fds=True, preexec_fn=_end_with_parent)
    address_file = temp_dir / "ray_current_cluster"  # what `ray start` writes once the head runs
    deadline = time.time() + START_TIMEOUT_SECONDS
    while not (address_file.exists() and address_file.read_text().strip()):
        if process.poll() is not None or time.time() > deadline:
            LocalHead(process, temp_dir, "")._end()  # its temp dir stays: the line below names its logs
            why = f"exited with code {process.returncode}" if process.returncode is not None else \
                f"did not start within {START_TIMEOUT_SECONDS:.0f} s"
            raise LongtrainError(f"the local Ray head ({' '.join(command[3:6])} ...) {why}; see {log_file} and "
                                 f"Ray's logs under {temp_dir}/session_latest/logs (raylet.err, dashboard_agent.log)")
        time.sleep(0.1)
    head = LocalHead(process, temp_dir, address_file.read_text().strip())
    atexit.register(head.stop)  # a driver ending on an uncaught exception, before `stop`
    return head


def _end_with_parent() -> None:
    """In the head's process before `ray start` runs: SIGTERM when the driver ends, however it ends (os._exit
    after a Ctrl-C, SIGKILL), and `ray start` then stops its Ray processes (PR_SET_PDEATHSIG; Ray's own children
    share its fate the same way). `ray.init`'s head shared the driver's fate like this; `launch.guard` stays the
    second line."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    """A loopback port free now, for the one server `ray start` cannot be asked to bind itself (Ray Client's;
    Ray picks its other fixed-by-default ports the same way)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray_temp_root() -> str:
    root = os.path.join(tempfile.gettempdir(), "ray")
    os.makedirs(root, exist_ok=True)
    return root


def _tree(pid: int) -> List[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
