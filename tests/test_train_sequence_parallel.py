"""Ulysses sequence parallelism (parallel.sp_degree=2: two workers share each sequence) trains the same model as one
worker holding the whole sequence: equal losses step by step. Through `longtrain train` (real Ray, DeepSpeed and
gloo on CPU) for the plain recipe, resuming a run stopped at step 3; through the trainer alone (no Ray) with
DeepSpeed's activation checkpointing (its long-sequence recipe keeps the inputs in host memory: GPU only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spec.config import job_to_yaml, load_job_config
from tests.conftest import step_losses, train_without_ray

pytestmark = pytest.mark.slow
COMMON = ["train.max_steps=5", "train.log_every_steps=1", "checkpoint.every_steps=0", "data.micro_batch_size=2",
          "optim.warmup_steps=1", "train.zero_stage=3"]
SP = ["parallel.sp_degree=2"]


def _run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *COMMON, "cluster.num_workers=2", *SP,
                             *overrides], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "converting" not in result.stdout  # the same workers: ZeRO's shards fit as they are
    return result


def _assert_close(losses, whole):
    assert len(losses) == len(whole) == 5
    for got, want in zip(losses, whole):
        assert abs(got - want) <= 1e-4 * abs(want), (losses, whole)


@pytest.fixture(scope="module")
def whole_sequence(tmp_path_factory):
    """Rank 0's loss at each step of one worker training on whole sequences (the trainer without Ray: its losses
    are bit for bit those of `longtrain train cluster.num_workers=1`)."""
    losses = step_losses(train_without_ray(tmp_path_factory.mktemp("whole"), 1, COMMON))
    return [losses[step][0] for step in sorted(losses)]


def test_two_ranks_sharing_each_sequence_under_deepspeed_checkpointing_train_like_one(tmp_path, whole_sequence):
    losses = step_losses(train_without_ray(tmp_path, 2, [*COMMON, *SP, "train.activation_checkpointing=deepspeed"]))
    _assert_close([losses[step][0] for step in sorted(losses)], whole_sequence)


def test_a_sequence_parallel_run_trains_like_one_worker_and_resumes_exactly(tmp_path, whole_sequence):
    """Steps 1-3 by the trainer's two ranks without Ray, stopped at step 3 (ZeRO sharded its state over both ranks,
    the Ulysses group's too), then `longtrain train resume=RUN_DIR` (real Ray) continues the run: no conversion,
    and steps 1-3 before the stop and 4-5 after it are the one-worker run's. The stop is the trainer's own
    (train.stop_at_step), the same with or without Ray; the resume is the driver's and the Ray workers'."""
    run_dir = tmp_path / "run"
    stopped = [*COMMON, *SP, "train.stop_at_step=3"]
    before = step_losses(train_without_ray(run_dir, 2, stopped))
    job = load_job_config(None, ["cluster.num_workers=2", *stopped, f"run.dir={run_dir}"])
    (run_dir / "config.yaml").write_text(job_to_yaml(job))  # what the driver writes into a run it starts
    resumed = _run(tmp_path, f"resume={run_dir}")
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in resumed.stdout, \
        resumed.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = [(m["step"], m["rows"][0]["loss"]) for m in records if m.get("rows")]
    assert sorted(before) == [1, 2, 3] and [step for step, _ in after] == [4, 5]  # a resume that retrained from
    # step 1 logs 1-5
    _assert_close([before[step][0] for step in (1, 2, 3)] + [loss for _, loss in after], whole_sequence)
    # each rank counts its own shard: half the sequence's tokens
    assert [m for m in records if m.get("rows")][-1]["rows"][0]["tokens"] == 2 * 256 // 2
