"""Job submission through Ray's Jobs API against a real two-node Ray cluster on loopback: submit the default job and
follow it to SUCCEEDED with its workers on both nodes (`submit --follow`), read its logs, stop a second job (its
summary and resume command), a failed job (`submit --wait`), `status` exit codes, and the one-line errors (a
`ray://` or GCS address refusing us among them). About two minutes."""

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

from launch.cli import main
from launch.local_head import HEAD_ENV, kill_processes
from tests.conftest import free_port

pytestmark = pytest.mark.slow
RUNS = Path(tempfile.mkdtemp(prefix="longtrain-test-jobs-"))
"""Run directories of the submitted jobs: an absolute path, as on a real cluster's shared storage."""
CLUSTER_MARK = "LONGTRAIN_TEST_RAY_CLUSTER"
"""Set in the environment of `ray start`: every process of the test cluster inherits it."""
TAKEN_PORTS = [6379, 8265, 10001, 52365, 6391, 8276, 52481, 52482]
"""Held by another process while the cluster starts: Ray's default GCS, dashboard, Ray Client and dashboard-agent
ports (another Ray on this machine holds them) and the fixed ports this cluster had before (52481/52482 lie in the
range the OS hands out as free ports, so any process could hold them). The cluster must start all the same."""


class Cluster(NamedTuple):
    dashboard: str
    gcs: str
    ray_client: str


@pytest.fixture(scope="module")
def cluster():
    """A two-node cluster on loopback (a head and a second Ray node, one CPU each, so a 2-worker job spans both),
    with Ray's token authentication on and a token of its own, which longtrain's Jobs client sends. Every port is
    free when chosen, as `launch.local_head` chooses them: 0 where `ray start` takes it (the OS picks), a free one
    where it does not (the dashboard's, Ray Client's)."""
    temp = tempfile.mkdtemp(prefix="lt-ray-")  # short: Ray's socket paths under it must stay within AF_UNIX's 107
    # bytes, which pytest's own temporary folders (deeper with two processes: popen-gw0/) exceed
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {key: os.environ.get(key) for key in token}
    os.environ.update(token)
    mark = secrets.token_hex(8)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **{CLUSTER_MARK: mark})
    env.update(HEAD_ENV)
    ray = str(Path(sys.executable).parent / "ray")
    # each node's dashboard agent on a port of its own (both default to 52365): 0, the OS picks
    ports = ["--dashboard-agent-listen-port=0", "--min-worker-port=0", "--max-worker-port=0"]
    dashboard_port, client_port = free_port(), free_port()
    try:
        with _held(TAKEN_PORTS):
            subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", "--port=0", *ports,
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=1",
                            f"--ray-client-server-port={client_port}", f"--temp-dir={temp}", "--disable-usage-stats"],
                           check=True, env=env, capture_output=True, timeout=180)
            gcs = (Path(temp) / "ray_current_cluster").read_text().strip()
            subprocess.run([ray, "start", f"--address={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1", *ports,
                            "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
        yield Cluster(f"http://127.0.0.1:{dashboard_port}", gcs, f"ray://127.0.0.1:{client_port}")
    finally:  # also when a start failed: no cluster and no token left behind for the process's later tests
        _kill_cluster(mark)
        shutil.rmtree(RUNS, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_head(cluster):
    """The cluster's dashboard address, which the jobs commands take."""
    return cluster.dashboard


@contextmanager
def _held(ports):
    """Each port that is free now bound by this process (no listening) until the block ends."""
    with ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # held already: as good
                pass
        yield


def _kill_cluster(mark: str) -> None:
    """Kill this cluster's processes only: those that inherited the mark and their children (the dashboard's
    module processes, forked by a marked forkserver, read as unmarked). `ray stop` would kill every Ray on the
    machine, other tests' private ones among them when tests run side by side."""
    marked = {}
    for process in psutil.process_iter():
        try:
            if process.environ().get(CLUSTER_MARK) == mark:
                marked.update((p.pid, p) for p in [process, *process.children(recursive=True)])
        except (psutil.Error, OSError):  # gone meanwhile, or another user's
            continue
    kill_processes(list(marked.values()), timeout=30)


def _cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _wait_for(capsys, address, job_id, wanted, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        _, out, _ = _cli(capsys, "status", job_id, "--address", address)
        if any(state in out for state in wanted):
            return out
        time.sleep(2)
    raise AssertionError(f"{job_id} did not reach {wanted}: {out}")


def test_submitted_job_runs_to_success_and_its_logs_hold_the_summary(ray_head, capsys):
    code, out, _ = _cli(capsys, "submit", "train.max_steps=30", "train.log_every_steps=10",
                        "checkpoint.every_steps=0", f"run.root={RUNS}", "--address", ray_head, "--follow")
    assert code == 0 and "longtrain logs" in out and "run summary" in out  # --follow: the logs streamed
    job_id = re.search(r"submitted (\S+)", out).group(1)
    assert out.rstrip().endswith(f"{job_id}: SUCCEEDED (Job finished successfully.)"), out[-3000:]
    code, status, _ = _cli(capsys, "status", job_id, "--address", ray_head)
    assert code == 0 and "SUCCEEDED" in status  # status exit codes: 0 succeeded
    code, logs, _ = _cli(capsys, "logs", job_id, "--address", ray_head)
    assert code == 0 and "run summary" in logs and "MFU" in logs
    node_rows = re.findall(r"^\s+(node\d+/\S+)\s+1\s", logs, re.MULTILINE)  # one rank on each of two nodes
    assert len(set(node_rows)) == 2, logs[-2000:]
    code, listing, _ = _cli(capsys, "jobs", "--address", ray_head)
    assert job_id in listing


def test_a_running_job_stops_with_its_summary_and_the_command_that_resumes_it(ray_head, capsys, tmp_path, monkeypatch):
    """Submitted from another folder with a relative config path, the resume command names the config file by its
    absolute path (the job runs a copy of it under its bare name)."""
    (tmp_path / "experiments").mkdir()
    config = tmp_path / "experiments" / "mine.yaml"
    config.write_text("train:\n  log_every_steps: 5\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(capsys, "submit", "experiments/mine.yaml", "train.max_steps=5000", "checkpoint.every_steps=5",
                        f"run.root={RUNS}", "--address", ray_head)
    job_id = re.search(r"submitted (\S+)", out).group(1)
    _wait_for(capsys, ray_head, job_id, ("RUNNING",), 120)
    _wait_for_log(capsys, ray_head, job_id, "checkpoint step 5 ->", 180)
    code, out, _ = _cli(capsys, "stop", job_id, "--address", ray_head)
    assert code == 0 and f"{job_id}: STOPPED" in out and re.search("^run summary$", out, re.MULTILINE), out
    resume = next(line for line in out.splitlines() if line.startswith("resume with: "))
    assert resume.startswith(f"resume with: longtrain submit {config} train.max_steps=5000 "), resume
    assert re.search(rf"resume={RUNS}/default-\S+ --address {ray_head}$", resume) and "cluster.address" not in resume
    code, status, _ = _cli(capsys, "status", job_id, "--address", ray_head)
    assert code == 3 and "STOPPED" in status  # status exit codes: 3 stopped
    logs = _cli(capsys, "logs", job_id, "--address", ray_head)[1]
    assert "longtrain: stopped by SIGTERM" in logs and "Traceback" not in logs, logs[-3000:]


def _wait_for_log(capsys, address, job_id, text, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        logs = _cli(capsys, "logs", job_id, "--address", address)[1]
        if text in logs:
            return
        time.sleep(2)
    raise AssertionError(f"{job_id}: {text!r} not in its logs: {logs[-2000:]}")


def test_unknown_job_and_bad_config_fail_in_one_line(ray_head, capsys):
    code, _, err = _cli(capsys, "status", "no-such-job", "--address", ray_head)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not found" in err
    code, _, err = _cli(capsys, "submit", "model.num_layrs=3", "--address", ray_head)
    assert code == 2 and "model.num_layrs" in err
    code, _, err = _cli(capsys, "submit", "run.root=runs", "--address", ray_head)  # would vanish with the job
    assert code == 2 and len(err.strip().splitlines()) == 1 and "run.root=runs is relative" in err


def test_a_gpu_job_on_a_cluster_without_gpus_fails_with_the_reason_in_status(ray_head, capsys):
    code, out, _ = _cli(capsys, "submit", "cluster.use_gpu=true", f"run.root={RUNS}", "--address", ray_head, "--wait")
    assert code == 1 and "FAILED" in out, out  # --wait: status's exit code, 1 failed
    job_id = re.search(r"submitted (\S+)", out).group(1)
    code, status, _ = _cli(capsys, "status", job_id, "--address", ray_head)
    assert code == 1 and "FAILED" in status
    why = next(line for line in status.splitlines() if line.strip().startswith("why:"))
    assert "0 GPUs" in why and "cluster.use_gpu=false" in why


@pytest.mark.parametrize("kind", ["ray_client", "gcs"], ids=["ray-client", "gcs"])
@pytest.mark.parametrize("auth, said", [({}, "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"),
                                        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                                         "the cluster refused our token")], ids=["no-token", "wrong-token"])
def test_an_address_refusing_us_is_one_line_naming_the_fix(cluster, kind, auth, said, tmp_path):
    """The head's Ray Client server (ray://HOST:PORT) and its GCS (HOST:PORT) ask for a token: without
    RAY_AUTH_MODE=token, or with the wrong token, `train` says so in a second or two instead of Ray's 30 s 'ray client
    connection timeout' or 20 s of GCS retries and a traceback. About 4 s each (a fresh `longtrain train`). Timed from
    the CLI's `main` (Ray's import included), not from the interpreter's start: on the loaded 2-core machine the
    start-up alone ran past 15 s once."""
    address = getattr(cluster, kind)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | auth
    timed_main = ("import sys, time; from launch.cli import main; started = time.time(); code = main(sys.argv[1:]); "
                  "print(f'main took {time.time() - started:.2f} s'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", timed_main, "train", f"cluster.address={address}",
                             f"run.root={tmp_path}"], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and said in err[0], result.stderr[-2000:]
    seconds = float(re.search(r"main took ([\d.]+) s", result.stdout).group(1))
    assert f"cluster.address ({address})" in err[0] and seconds < 15, (seconds, err)
    assert not any(tmp_path.iterdir())  # the run directory it created is gone again
