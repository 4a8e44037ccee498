"""While a local `longtrain train` runs: its private Ray is private (every socket that any process of the run listens
on, Ray's GCS, raylet, agents and workers and DeepSpeed over gloo, is bound to loopback, and Ray's token
authentication is on: the dashboard agent's HTTP API refuses a request without the token), and its run directory is
its own (a second `longtrain train` of it is refused in one line before it writes anything there). One real run
serves both: they are watched while it runs, and it must then end normally."""

import http.client
import ipaddress
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pathlib import Path

import psutil
import pytest

from launch.runlock import LOCK_NAME

pytestmark = pytest.mark.slow
ARGS = ["train.max_steps=12", "train.log_every_steps=4", "checkpoint.every_steps=0", "data.seq_len=128",
        "data.micro_batch_size=2", "optim.warmup_steps=2"]


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def listeners(root: psutil.Process) -> set:
    """(address, port, process name) of every listening TCP socket and bound UDP socket of root and its
    descendants (Ray's servers, workers and agents are all started below the driver)."""
    try:
        pids = {p.pid: p.name() for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for conn in psutil.net_connections(kind="inet"):
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == 2 and not conn.raddr)
        if conn.pid in pids and listening:
            found.add((conn.laddr.ip, conn.laddr.port, pids[conn.pid]))
    return found


def _agent_refuses_anonymous(found: set) -> bool:
    """Some DashboardAgent HTTP port answered 401/403 without the token (Ray's token authentication)."""
    for address, port, name in found:
        if "DashboardAgent" not in name:
            continue
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/job_agent/jobs/", timeout=2)
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                return True
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            continue
    return False


def _watch(process: subprocess.Popen, run_dir: Path, command: list):
    """Poll the run's listening sockets until it ends: (all seen, whether the agent refused an anonymous call, the
    second run of its directory started once the first wrote its config)."""
    root, seen, refused, second = psutil.Process(process.pid), set(), False, None
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        now = listeners(root)
        seen |= now
        refused = refused or _agent_refuses_anonymous(now)
        if second is None and (run_dir / "config.yaml").exists():
            second = subprocess.run(command, cwd=run_dir.parent, capture_output=True, text=True, timeout=120)
        time.sleep(0.5)
    return seen, refused, second


def test_a_running_local_run_is_private_and_holds_its_directory(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launch.cli", "train", *ARGS, f"run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        seen, refused, second = _watch(process, run_dir, command)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out[-2000:] + err[-2000:]  # the first run was not disturbed
    assert second is not None, "the run ended before its config.yaml appeared"
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert f"run directory {run_dir} is in use by another longtrain run (pid {process.pid} on" in lines[0]
    assert list(run_dir.glob("config*.yaml")) == [run_dir / "config.yaml"]  # the second wrote no config copy
    assert not (run_dir / LOCK_NAME).exists()  # the first released its lock at its end
    names = {name for _, _, name in seen}
    print(sorted(seen))
    assert "gcs_server" in names and "raylet" in names and any("RayTrainWorker" in n for n in names)
    unused = {"ray::DatasetManager", "ray::PlacementGroupCleaner", "ray::_AutoscalingCoordinatorActor"}
    assert not names & unused, names & unused  # Ray Train parts a local run has no use for (launch.ray_train)
    exposed = sorted(entry for entry in seen if not is_loopback(entry[0]))
    assert not exposed, f"listening off loopback: {exposed}"
    assert refused, "the dashboard agent answered without a token"
