"""A worker killed mid-run: Ray Train restarts the worker group (train.max_failures), the workers resume from the
run's latest complete checkpoint, and the run ends at the same step with the same loss as an uninterrupted one (the
trainer's own run without Ray: bit for bit a `longtrain train` run's)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import step_losses, train_without_ray

pytestmark = pytest.mark.slow
ARGS = ["train.max_steps=20", "train.log_every_steps=10", "checkpoint.every_steps=10", "optim.warmup_steps=5",
        "data.micro_batch_size=4"]


def _final(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return last["step"], [r["loss"] for r in sorted(last["rows"], key=lambda r: r["rank"])]


def _kill_rank1_after_first_checkpoint(run_dir: Path, process: subprocess.Popen) -> None:
    marker = run_dir / "checkpoints" / "step_00000010" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    os.kill(int((run_dir / "logs" / "rank1.pid").read_text()), signal.SIGKILL)


def test_killed_worker_is_restarted_and_the_run_matches_an_uninterrupted_one(tmp_path):
    command = [sys.executable, "-m", "launch.cli", "train", *ARGS]
    straight = step_losses(train_without_ray(tmp_path / "straight", 2, ARGS))
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([*command, f"run.dir={killed_dir}", "train.max_failures=1"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_rank1_after_first_checkpoint(killed_dir, process)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    assert "resumed from" in out
    assert _final(killed_dir) == (20, straight[20])
