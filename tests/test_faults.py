"""Faults of a real `longtrain train` (local Ray, DeepSpeed, the debug model): the driver SIGKILLed, Ctrl-C to the
process or to its whole process group (once or twice), the disk filling up while checkpointing. Each ends with no
process of the run left, and (but the SIGKILL) one stderr line naming what happened and the resume command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.guard import RUN_MARK
from launch.local_head import temp_dirs_of_run
from tests.conftest import mount_tmpfs

pytestmark = pytest.mark.slow
TINY = ["model.num_layers=2", "data.seq_len=64", "data.micro_batch_size=2", "optim.warmup_steps=2",
        "cluster.num_workers=2"]


def _start(run_dir: Path, *args: str, key: str = "run.dir") -> subprocess.Popen:
    """`longtrain train` in its own session (a process group of its own, as a terminal gives it), writing into
    run_dir (key=run.dir) or under it (key=run.root)."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", *TINY, f"{key}={run_dir}", *args],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _tree(process: subprocess.Popen) -> list:
    """The driver's descendants now: the guard, Ray's GCS, raylet and agents, the actors and the workers."""
    return psutil.Process(process.pid).children(recursive=True)


def _run_mark(tree: list) -> str:
    """The run's mark, which the driver set after it started (its /proc environ shows what it started with)."""
    for process in tree:
        try:
            if RUN_MARK in process.environ():
                return process.environ()[RUN_MARK]
        except psutil.Error:
            continue
    raise AssertionError("no process of the run carries its mark")


def _alive(processes: list) -> list:
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in processes if running(p)]


def _gone_within(processes: list, seconds: float) -> list:
    """The processes still alive after `seconds` (returns as soon as none is)."""
    deadline = time.time() + seconds
    while _alive(processes) and time.time() < deadline:
        time.sleep(0.25)
    return [(p.pid, p.name()) for p in _alive(processes)]


def _workers(run_dir: Path) -> list:
    return [psutil.Process(int(path.read_text())) for path in sorted((run_dir / "logs").glob("rank*.pid"))]


def test_a_killed_driver_leaves_no_process_of_the_run(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, "train.max_steps=100000", "checkpoint.every_steps=5", "train.log_every_steps=5")
    _wait_for(run_dir / "checkpoints" / "latest", process)
    workers, tree = _workers(run_dir), _tree(process)
    assert len(workers) == 2 and len(tree) > 5
    temp_dirs = temp_dirs_of_run(_run_mark(tree))
    assert len(temp_dirs) == 1
    process.kill()
    process.wait()
    assert _gone_within(workers, 10) == [], "workers outlived the driver by 10 s"
    assert _gone_within(tree, 30) == [], "processes of the run outlived the driver by 30 s"
    assert (run_dir / "logs" / "ray" / "raylet.out").is_file() and not temp_dirs[0].exists()  # by the guard
    tags = sorted((run_dir / "checkpoints").glob("step_*"))
    time.sleep(1)
    assert sorted((run_dir / "checkpoints").glob("step_*")) == tags  # and nothing trains or saves any more


@pytest.mark.parametrize("to_group,times", [(True, 2), (False, 1)], ids=["group, twice", "process, once"])
# a terminal's Ctrl-C signals the whole group: the second one lands while the first one's cleanup runs
def test_ctrl_c_exits_130_with_the_resume_command_and_no_process_left(tmp_path, to_group, times):
    run_dir = tmp_path / "run"
    process = _start(run_dir, "train.max_steps=100000", "checkpoint.every_steps=5", "train.log_every_steps=5")
    _wait_for(run_dir / "checkpoints" / "latest", process)
    tree = _tree(process)
    temp_dirs = temp_dirs_of_run(_run_mark(tree))
    for _ in range(times):
        try:
            (os.killpg if to_group else os.kill)(process.pid, signal.SIGINT)
        except ProcessLookupError:  # the first one already ended it
            break
        time.sleep(0.3)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and 1 <= len(err.splitlines()) <= times, err
    for line in err.splitlines():
        assert line.startswith("longtrain: interrupted") and line.endswith(f"resume={run_dir}"), line
        assert "resume with: longtrain train" in line
    assert _gone_within(tree, 15) == []
    assert (run_dir / "logs" / "ray" / "raylet.out").is_file()  # a run that did not finish keeps Ray's logs
    assert len(temp_dirs) == 1 and not temp_dirs[0].exists()


def test_a_full_disk_is_one_line_with_the_path_and_the_resume_command(tmp_path):
    """A 9 MiB tmpfs as run.root: the step-10 checkpoint (6.2 MB) fits, the step-20 one does not. Whichever write fails first
    (a worker's checkpoint, the driver's metrics line), the user gets one line naming the path; the step-10
    checkpoint stays the complete one and metrics.jsonl holds whole lines only."""
    root = tmp_path / "small"
    mount_tmpfs(root, "9m")
    try:
        process = _start(root, "train.max_steps=30", "checkpoint.every_steps=10", "train.log_every_steps=1",
                         key="run.root")
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, out[-2000:] + err[-3000:]
        (run_dir,) = root.iterdir()
        assert len(err.splitlines()) == 1, err[-3000:]
        (line,) = err.splitlines()
        assert "Traceback" not in err and str(run_dir) in line, line
        assert ("No space left on device" in line or "MiB free there" in line) and line.endswith(
            f"resume with: longtrain train {' '.join(TINY)} run.root={root} train.max_steps=30 "
            f"checkpoint.every_steps=10 train.log_every_steps=1 resume={run_dir}"), line
        checkpoints = run_dir / "checkpoints"
        assert (checkpoints / "latest").read_text() == "step_00000010" and (checkpoints / "step_00000010" /
                                                                            "COMPLETE").is_file()
        text = (run_dir / "metrics.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(line)["kind"] == "step" for line in text.splitlines())
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
