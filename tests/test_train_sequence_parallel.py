"""`longtrain train` with Ulysses sequence parallelism (parallel.sp_degree=2: two Ray workers share each
sequence) trains the same model as one worker holding the whole sequence: equal losses step by step, also with
DeepSpeed's activation checkpointing (its long-sequence recipe keeps the inputs in host memory: GPU only). Real Ray, DeepSpeed and gloo on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
COMMON = ["train.max_steps=5", "train.log_every_steps=1", "checkpoint.every_steps=0", "data.micro_batch_size=2",
          "optim.warmup_steps=1", "train.zero_stage=3"]


def _run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *COMMON, *overrides], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "converting" not in result.stdout  # the same workers: ZeRO's shards fit as they are
    return result


def _logged(cwd: Path):
    """(step, rank 0's loss) of every logged step in the run's metrics.jsonl, in the order written."""
    (run_dir,) = (cwd / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(message["step"], message["rows"][0]["loss"]) for message in rows if message.get("rows")], rows


def _losses(cwd: Path, *overrides: str):
    _run(cwd, *overrides)
    logged, rows = _logged(cwd)
    return [loss for _, loss in logged], rows


@pytest.fixture(scope="module")
def whole_sequence(tmp_path_factory):
    losses, _ = _losses(tmp_path_factory.mktemp("whole"), "cluster.num_workers=1")
    return losses


@pytest.mark.parametrize("recipe", ["none", "deepspeed"])  # deepspeed_cpu: GPU only (tests/test_gpu.py)
def test_two_ranks_sharing_each_sequence_train_like_one(tmp_path, whole_sequence, recipe):
    losses, rows = _losses(tmp_path, "cluster.num_workers=2", "parallel.sp_degree=2",
                           f"train.activation_checkpointing={recipe}")
    assert len(losses) == len(whole_sequence) == 5
    for got, want in zip(losses, whole_sequence):
        assert abs(got - want) <= 1e-4 * abs(want), (losses, whole_sequence)
    # each rank counts its own shard: half the sequence's tokens
    assert rows[-1]["rows"][0]["tokens"] == 2 * 256 // 2


def test_a_sequence_parallel_run_resumes_exactly(tmp_path, whole_sequence):
    """Stopped at step 3 and resumed: ZeRO sharded its state over both ranks (the Ulysses group's too), so the
    resume needs no conversion and steps 4-5 are the uninterrupted run's."""
    sp = ["cluster.num_workers=2", "parallel.sp_degree=2"]
    _run(tmp_path, *sp, "train.stop_at_step=3")
    (run_dir,) = (tmp_path / "runs").iterdir()
    resumed = _run(tmp_path, *sp, f"resume={run_dir}")
    assert "at step 3" in resumed.stdout and "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    logged, _ = _logged(tmp_path)
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5]  # a resume that retrained from step 1 repeats 1-3
    for (step, got), want in zip(logged[-2:], whole_sequence[-2:]):
        assert abs(got - want) <= 1e-4 * abs(want), (logged, whole_sequence)
