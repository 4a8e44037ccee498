"""Two local runs' private Rays alive at once on one machine (two `longtrain train`, or two test processes): both
start and run a task, no port is bound by both (Ray's defaults fix a few: the dashboard agent's 52365, Ray
Client's 10001, the metrics servers' 44217 and 44227), each dashboard agent serves its HTTP API (Ray's token
authentication refuses an anonymous call) and each head is gone once its driver disconnects, with its temp dir
under /tmp/ray (a failed run's Ray logs copied to its run directory first). Real Ray, through
`launch.ray_train.connect`/`disconnect` as `longtrain train` calls them; ~15-25 s."""

import http.client
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

DRIVER = """
import os, sys, time
from pathlib import Path
import ray
from launch import ray_train
from spec.config import load_job_config

log_dir, release, failed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "failed"
ray_train.connect(load_job_config(None, ["cluster.num_workers=1"]).cluster, log_dir)
print("task ran in", ray.get(ray.remote(lambda: os.getpid()).remote()), flush=True)
print("temp dir", ray_train._local_head.temp_dir, flush=True)
(log_dir / "up").touch()
while not release.exists():
    time.sleep(0.2)
ray_train.disconnect(log_dir / "ray" if failed else None)
"""
"""A driver as `longtrain train` is one: a run that finished (argv[3] "finished") or failed ("failed")."""


def _tree(pid: int) -> list:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(processes: list) -> dict:
    """{port: process name} of the TCP sockets the processes listen on."""
    names = {}
    for process in processes:
        try:
            names[process.pid] = process.name()
        except psutil.Error:
            continue
    return {c.laddr.port: names[c.pid] for c in psutil.net_connections(kind="tcp")
            if c.pid in names and c.status == psutil.CONN_LISTEN}


def _agent_refuses_anonymous(ports: dict) -> bool:
    for port, name in ports.items():
        if "DashboardAgent" in name:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/job_agent/jobs/", timeout=2)
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    return True
            except (OSError, http.client.HTTPException):
                continue
    return False


def test_two_local_rays_at_once_share_no_port_and_both_run(tmp_path):
    release = tmp_path / "release"
    logs = [tmp_path / "a", tmp_path / "b"]
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, str(log), str(release), how], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for log, how in zip(logs, ["finished", "failed"])]
    try:
        deadline = time.time() + 180
        while not all((log / "up").exists() for log in logs):
            for driver in drivers:
                assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "the two local Rays did not both start within 180 s"
            time.sleep(0.2)
        trees = [_tree(driver.pid) for driver in drivers]
        ports = [_listening(tree) for tree in trees]
        shared = sorted(set(ports[0]) & set(ports[1]))
        assert not shared, f"ports bound by both local Rays: {[(p, ports[0][p], ports[1][p]) for p in shared]}"
        assert all(_agent_refuses_anonymous(p) for p in ports), f"a dashboard agent without its HTTP API: {ports}"
    finally:
        release.touch()
        outputs = [driver.communicate(timeout=120) for driver in drivers]
    for driver, (out, err) in zip(drivers, outputs):
        assert driver.returncode == 0 and "task ran in" in out, err[-3000:]
    left = [p for tree in trees for p in tree if _running(p)]
    assert not left, f"left running after disconnect: {[p.pid for p in left]}"
    temp_dirs = [Path(out.split("temp dir ")[1].split()[0]) for out, _ in outputs]
    assert not [d for d in temp_dirs if d.exists()], f"a head's temp dir left after disconnect: {temp_dirs}"
    assert not (logs[0] / "ray").exists() and (logs[1] / "ray" / "raylet.out").is_file()  # the failed run's copy


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
