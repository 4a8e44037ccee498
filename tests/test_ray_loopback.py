"""The private Ray of a local run is private: while `longtrain train` runs (Ray's GCS, raylet, agents and workers,
DeepSpeed over gloo), every socket that any process of the run listens on is bound to loopback, and Ray's token
authentication is on (the dashboard agent's HTTP API refuses a request without the token)."""

import http.client
import ipaddress
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

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


def _watch(process: subprocess.Popen):
    """Poll the run's listening sockets until it ends: (all seen, whether the agent refused an anonymous call)."""
    root, seen, refused = psutil.Process(process.pid), set(), False
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        now = listeners(root)
        seen |= now
        refused = refused or _agent_refuses_anonymous(now)
        time.sleep(0.5)
    return seen, refused


def test_a_local_run_listens_on_loopback_only_with_token_auth(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *ARGS, f"run.dir={tmp_path / 'run'}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        seen, refused = _watch(process)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    names = {name for _, _, name in seen}
    print(sorted(seen))
    assert "gcs_server" in names and "raylet" in names and any("RayTrainWorker" in n for n in names)
    exposed = sorted(entry for entry in seen if not is_loopback(entry[0]))
    assert not exposed, f"listening off loopback: {exposed}"
    assert refused, "the dashboard agent answered without a token"
