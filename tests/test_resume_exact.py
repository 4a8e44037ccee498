"""Exact resume: a run stopped at step k (train.stop_at_step, a checkpoint) and resumed to 2k gives bit for bit the
losses of an uninterrupted run, for ZeRO 0 with 1 and 2 workers and ZeRO 2 and 3 sharded over 2. The workers run
the real DeepSpeed loop (`orchestrator.trainer.train`) in spawned processes over gloo, without Ray, to keep this
matrix fast."""

from pathlib import Path

import pytest

from tests.conftest import spawn_gloo
from spec.config import load_job_config

pytestmark = pytest.mark.slow
STOP, TOTAL = 4, 8


def _worker(rank, world, put, job, run_dir):
    import torch

    from orchestrator.trainer import WorkerInfo, train

    train(job, Path(run_dir), WorkerInfo(rank, world, rank, "node0"), put)
    put({"kind": "rng", "rank": rank, "draws": torch.rand(4).tolist()})  # where this rank's RNG stream stands


def _job(world: int, *overrides):
    return load_job_config(None, [f"cluster.num_workers={world}", f"train.max_steps={TOTAL}", "train.log_every_steps=1",
                                  "optim.warmup_steps=2", "checkpoint.every_steps=0", "data.seq_len=128",
                                  "data.micro_batch_size=4", *overrides])


def _losses(run_dir: Path, world: int, *overrides):
    messages = spawn_gloo(_worker, world, _job(world, *overrides), str(run_dir))
    losses = {m["step"]: [r["loss"] for r in sorted(m["rows"], key=lambda r: r["rank"])]
              for m in messages if m["kind"] == "step"}
    return losses, {m["rank"]: m["draws"] for m in messages if m["kind"] == "rng"}


@pytest.mark.parametrize("zero_stage,world", [(0, 1), (0, 2), (2, 2), (3, 2)])  # ZeRO-2/3 shard over 2 ranks
def test_stopped_and_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, zero_stage, world):
    straight, straight_rng = _losses(tmp_path / "straight", world, f"train.zero_stage={zero_stage}")
    first, _ = _losses(tmp_path / "split", world, f"train.zero_stage={zero_stage}", f"train.stop_at_step={STOP}")
    second, second_rng = _losses(tmp_path / "split", world, f"train.zero_stage={zero_stage}")
    assert sorted(first) == list(range(1, STOP + 1)) and sorted(second) == list(range(STOP + 1, TOTAL + 1))
    assert {**first, **second} == straight
    assert second_rng == straight_rng  # each rank's RNG stream continues where the checkpoint left it


def test_resume_with_compression_restores_running_ranges_and_sampling_steps(tmp_path):
    """Mesa/S2A ranges are running estimates and WTA-CRS draws are seeded by a step count: both travel in the
    per-rank checkpoint file, or the resumed losses drift from the uninterrupted run's."""
    compression = ["compression.linear_inputs=int8", "compression.silu=int4", "compression.wta_crs_keep_ratio=0.5"]
    straight, _ = _losses(tmp_path / "straight", 1, *compression)
    first, _ = _losses(tmp_path / "split", 1, *compression, f"train.stop_at_step={STOP}")
    second, _ = _losses(tmp_path / "split", 1, *compression)
    assert {**first, **second} == straight


def test_zero_1_and_2_share_a_format_so_a_run_may_switch_between_them_on_resume(tmp_path):
    """The driver lets a ZeRO-1 run resume under ZeRO-2 (and refuses ZeRO-3), and the optimizer state carries over:
    steps 5-8 equal the uninterrupted ZeRO-1 run's."""
    from launch.rundir import place_run
    from orchestrator.checkpoint import prepare_resume
    from spec.errors import CheckpointError

    straight, _ = _losses(tmp_path / "straight", 1, "train.zero_stage=1")
    first, _ = _losses(tmp_path / "split", 1, "train.zero_stage=1", f"train.stop_at_step={STOP}")
    resume = f"resume={tmp_path / 'split'}"
    prepare_resume(_job(1, "train.zero_stage=2", resume), place_run(_job(1, "train.zero_stage=2", resume)))
    with pytest.raises(CheckpointError, match="train.zero_stage=1 to resume it"):
        prepare_resume(_job(1, "train.zero_stage=3", resume), place_run(_job(1, "train.zero_stage=3", resume)))
    second, _ = _losses(tmp_path / "split", 1, "train.zero_stage=2")
    assert sorted(second) == list(range(STOP + 1, TOTAL + 1))
    assert {**first, **second} == straight
