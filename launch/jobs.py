"""`longtrain submit / status / logs / stop / jobs`: the same training job on a remote Ray cluster, through Ray's
Jobs API (the cluster's dashboard address, http://HOST:8265).

The job ships longtrain's packages (from wherever they are installed: a checkout or site-packages) as its Python
modules and the config file as its working directory, and runs `python -m launch.cli train CONFIG ...
cluster.address=auto` on the cluster, so it joins that cluster instead of starting its own Ray; the resume commands
it prints name the config as submitted (`SUBMITTED_CONFIG_ENV`). Ray 2.60 dashboards
ask for a token: we send the one Ray keeps for this user (RAY_AUTH_TOKEN or ~/.ray/auth_token) when there is one,
with a warning when it would travel over plain http to another machine.
"""

import asyncio
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence
from urllib.parse import urlparse

from spec.config import load_job_config
from spec.config.loader import resolve_config_path
from spec.errors import LongtrainError

PACKAGES = ("spec", "planner", "orchestrator", "launch", "longtrain")
"""What the job imports: shipped whole, each from where this process imports it."""
UPLOAD_EXCLUDES = ["__pycache__", "*.pyc"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def connect(address: str):
    """A Jobs client, or one line saying why the cluster cannot be reached."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise LongtrainError(f"--address {address!r} must be the dashboard URL, e.g. http://HEAD:8265")
    quiet_ray_client()
    headers = _token_header()
    warning = plain_http_warning(address, bool(headers))
    if warning:
        print(warning, file=sys.stderr)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        raise LongtrainError(f"the Ray cluster at {address} refused our token; set RAY_AUTH_TOKEN to the "
                             "cluster's token (or put it in ~/.ray/auth_token)") from error
    except (ConnectionError, RuntimeError) as error:
        raise LongtrainError(f"cannot reach a Ray dashboard at {address} ({str(error).splitlines()[0][:120]}); "
                             "check the address and that the head runs (`ray start --head`)") from error


RAY_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")
"""The loggers whose INFO lines (`Uploading package ...`) the Jobs client prints to stderr: scripts reading our
output want only longtrain's lines; warnings and errors still show."""


def quiet_ray_client() -> None:
    import logging

    for name in RAY_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def plain_http_warning(address: str, sends_token: bool) -> Optional[str]:
    """One line when the token would cross the network unencrypted (http:// to a host that is not this machine)."""
    host = urlparse(address).hostname or ""
    if not sends_token or not address.startswith("http://") or _is_loopback(host):
        return None
    return (f"longtrain: warning: the Ray token goes to {address} over plain http, readable on the network; "
            "use https:// or reach the dashboard through an SSH tunnel (ssh -L 8265:localhost:8265 HEAD)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_header() -> dict:
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit(config_path: Optional[str], overrides: Sequence[str], address: str, wait: bool = False,
           follow: bool = False) -> int:
    """Submit the job; with `wait` or `follow` (its logs streamed meanwhile) return once it ended, with
    `status`'s exit code."""
    job = load_job_config(config_path, overrides)  # a bad config fails here, in one line, not on the cluster
    run_place = job.run.dir or job.run.root
    if not Path(run_place).is_absolute():
        key = "run.dir" if job.run.dir else "run.root"
        raise LongtrainError(f"{key}={run_place} is relative: on the cluster it would lie inside the job's working "
                             "directory, which Ray deletes (the run and its checkpoints with it); pass "
                             f"{key}=/ABSOLUTE/PATH on storage every node shares")
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="longtrain-submit-") as folder:
        config_name = _config_into(folder, config_path)
        arguments = [config_name] if config_name else []
        arguments += [o for o in overrides if not o.startswith("cluster.address")]
        entrypoint = " ".join(["python", "-m", "launch.cli", "train", *map(shlex.quote, arguments),
                               "cluster.address=auto"])
        runtime_env = job_runtime_env(folder, submitted_config_name(config_path))
        job_id = submit_when_agent_ready(client, address, entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id} to {address}\n"
          f"  status: longtrain status {job_id} --address {address}\n"
          f"  logs:   longtrain logs {job_id} --address {address} --follow\n"
          f"  stop:   longtrain stop {job_id} --address {address}", flush=True)
    if follow:
        _stream_logs(client, job_id)
    if not (wait or follow):
        return 0
    return _say_status(client, job_id, _wait_until_ended(client, job_id))


STOP_GRACE_SECONDS = 30
"""How long Ray's job supervisor waits after its SIGTERM before SIGKILL (RAY_JOB_STOP_WAIT_TIME_S, read by the
supervisor from the job's runtime_env; Ray's default is 3 s): time for the driver to print the run summary and the
resume command and end its workers."""


SUBMITTED_CONFIG_ENV = "LONGTRAIN_SUBMITTED_CONFIG"
"""The job's environment variable holding the config as `submit` was given it: the job runs a copy under its bare
name in its working directory, and names this one in the resume commands it prints (which the user pastes on the
machine they submitted from, where the bare name is not a file)."""


def submitted_config_name(config_path: Optional[str]) -> Optional[str]:
    """How printed commands name the submitted config: a file by its absolute path (pasted from any folder), a
    shipped config by the name it was given (found by that name anywhere)."""
    if not config_path:
        return None
    return os.path.abspath(config_path) if Path(config_path).is_file() else config_path


def job_runtime_env(working_dir: str, config_name: Optional[str] = None) -> dict:
    """longtrain's packages as the job's modules (never the folder holding them: for an installed wheel that is
    site-packages), `working_dir` (the config file) as its working directory, the stop grace period, and the
    config's name as submitted (`SUBMITTED_CONFIG_ENV`)."""
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_SECONDS)}
    if config_name:
        env_vars[SUBMITTED_CONFIG_ENV] = config_name
    return {"py_modules": package_dirs(), "working_dir": working_dir, "excludes": UPLOAD_EXCLUDES,
            "env_vars": env_vars}


def package_dirs() -> List[str]:
    return [importlib.util.find_spec(name).submodule_search_locations[0] for name in PACKAGES]


def _config_into(folder: str, config_path: Optional[str]) -> Optional[str]:
    """Copy the job's config file into the job's working directory; the name the job passes `train`."""
    if not config_path:
        return None
    source = resolve_config_path(config_path)
    shutil.copyfile(source, Path(folder) / source.name)
    return source.name


AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_SECONDS = 180.0
"""A head that has just started answers 500 "No available agent" until its node's job agent is up (seconds on an
idle machine, a minute or more on a loaded one): worth waiting for, not worth failing a script over."""


def submit_when_agent_ready(client, address: str, wait_seconds: float = AGENT_WAIT_SECONDS, **job) -> str:
    """`client.submit_job(**job)`, retried while the cluster has no job agent ready yet; then one line."""
    deadline = time.monotonic() + wait_seconds
    told = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if AGENT_NOT_READY not in str(error):
                raise
            if time.monotonic() >= deadline:
                raise LongtrainError(f"the Ray cluster at {address} has no job agent ready after {wait_seconds:.0f} "
                                     "s; check the head's dashboard_agent.log (ray status lists the nodes) and "
                                     "submit again") from error
            if not told:
                print(f"longtrain: the cluster's job agent is not ready yet; retrying for up to {wait_seconds:.0f} s",
                      file=sys.stderr)
                told = True
            time.sleep(2.0)


def status(job_id: str, address: str) -> int:
    client = connect(address)
    return _say_status(client, job_id, _job_info(client, job_id, address))


def _say_status(client, job_id: str, info) -> int:
    """`JOB: STATUS (message)`, the reason of a failure, and the exit code for scripts."""
    print(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    if str(info.status) == "FAILED":
        reason = failure_reason(client.get_job_logs(job_id))
        if reason:
            print(f"  why: {reason}")
    return status_exit_code(str(info.status))


POLL_SECONDS = 2.0


def _wait_until_ended(client, job_id: str, timeout: Optional[float] = None):
    """The job's info once it is SUCCEEDED, FAILED or STOPPED (or, with `timeout`, when that passed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return info
        time.sleep(POLL_SECONDS)


def _stream_logs(client, job_id: str) -> None:
    """The job's output as it comes, until the job ends."""
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


STATUS_EXIT_CODES = {"FAILED": 1, "STOPPED": 3}
"""`longtrain status` exit codes for scripts: 0 succeeded, running or pending; 1 failed; 3 stopped."""


def status_exit_code(status: str) -> int:
    return STATUS_EXIT_CODES.get(status, 0)


def failure_reason(logs: str) -> Optional[str]:
    """The last one-line error longtrain printed in the job's logs (what the user must change), if any."""
    lines = [line for line in logs.splitlines() if line.startswith("longtrain: ")]
    return lines[-1][len("longtrain: "):] if lines else None


def logs(job_id: str, address: str, follow: bool) -> int:
    client = connect(address)
    _job_info(client, job_id, address)
    if follow:
        _stream_logs(client, job_id)
    else:
        print(client.get_job_logs(job_id), end="")
    return 0


def stop(job_id: str, address: str) -> int:
    """Stop the job (SIGTERM to its driver, which stops the workers and prints its summary), wait for it to end,
    then print that summary and the command that resumes the run on the cluster."""
    client = connect(address)
    info = _job_info(client, job_id, address)
    if str(info.status) in TERMINAL:
        print(f"{job_id} already ended: {info.status}")
        return 0
    client.stop_job(job_id)
    print(f"stopping {job_id} ...", flush=True)
    info = _wait_until_ended(client, job_id, timeout=STOP_GRACE_SECONDS + 30)
    if str(info.status) not in TERMINAL:
        print(f"{job_id} is still {info.status}; follow with: longtrain status {job_id} --address {address}")
        return 0
    print(f"{job_id}: {info.status}")
    print(stop_report(client.get_job_logs(job_id), address))
    return 0


def stop_report(logs: str, address: str) -> str:
    """The run summary the stopped driver printed (from its `run summary` line on) and the resume command as a
    `longtrain submit` to the same cluster; what is known when the job stopped before either."""
    lines = logs.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "run summary"]
    summary = [line for line in lines[starts[-1]:] if line.strip() and not line.startswith("longtrain: ")] \
        if starts else []
    summary = [line for line in summary if "resume with" not in line]
    resumes = [m.group(1) for m in map(RESUME_LINE.search, lines) if m]
    if resumes:
        resume = f"resume with: {submit_command(resumes[-1], address)}"
    elif any("no checkpoint was written yet" in line for line in lines):
        resume = "no checkpoint was written yet: submit the same job again (without resume=)"
    else:
        resume = "the job stopped before its run started: submit it again"
    return "\n".join((summary or ["(no run summary in the job's logs: it stopped before a step was logged)"])
                     + [resume])


RESUME_LINE = re.compile(r"resume with:?\s+(longtrain train\b.*)$")


def submit_command(train_command: str, address: str) -> str:
    """`longtrain train ARGS cluster.address=auto resume=RUN` (what the driver printed) as the `longtrain submit`
    that resumes the run on the cluster at `address`."""
    words = [w for w in shlex.split(train_command)[2:] if not w.startswith("cluster.address=")]
    return " ".join(["longtrain", "submit", *map(shlex.quote, words), "--address", address])


def list_jobs(address: str) -> int:
    print(jobs_table(connect(address).list_jobs(), time.time()))
    return 0


def jobs_table(jobs, now: float) -> str:
    """One row per job, newest first: id, status, age, the run's name and its overrides (whole: cut entrypoints made
    different runs look alike)."""
    rows = [f"{'job':<28} {'status':<10} {'age':>8}  {'run':<24} overrides"]
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        name, overrides = _run_of(job.entrypoint)
        age = _age(now - job.start_time / 1000) if job.start_time else "-"
        rows.append(f"{job.submission_id or job.job_id:<28} {str(job.status):<10} {age:>8}  {name:<24} "
                    f"{' '.join(overrides)}")
    return "\n".join(rows)


def _run_of(entrypoint: str):
    """(run name, overrides) of a `python -m launch.cli train [CONFIG] [key=value ...]` entrypoint; the run name is
    the job's run.name, resolved here as `longtrain train` would."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return "?", [entrypoint]
    if words[:4] != ["python", "-m", "launch.cli", "train"]:
        return "(not longtrain)", [entrypoint]
    args = [w for w in words[4:] if w != "cluster.address=auto"]
    config = next((w for w in args if "=" not in w), None)
    overrides = [w for w in args if "=" in w]
    try:
        name = load_job_config(config, overrides).run.name
    except LongtrainError:  # a config only the cluster has: run.name, else the file's name
        named = [w.split("=", 1)[1] for w in overrides if w.startswith("run.name=")]
        name = named[-1] if named else Path(config or "default").stem
    return name, [w for w in overrides if not w.startswith("run.name=")]


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds}s"


def _job_info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as error:
        raise LongtrainError(f"job {job_id} not found on {address}; list the jobs with "
                             f"`longtrain jobs --address {address}`") from error
