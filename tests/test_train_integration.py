"""The README's main job, end to end: `longtrain train` on the embedded default (2 Ray workers, DeepSpeed
ZeRO-2, gloo on CPU), then a resume of the same run. Real Ray, real DeepSpeed; about three minutes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
DEMO_TIME_LIMIT_SECONDS = 300


def _longtrain(args, cwd):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=2 * DEMO_TIME_LIMIT_SECONDS)
    return result, time.time() - started


def _metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    result, seconds = _longtrain([], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return result, seconds, run_dir, cwd


def test_default_job_finishes_in_time_and_learns(default_run):
    result, seconds, run_dir, _ = default_run
    assert seconds < DEMO_TIME_LIMIT_SECONDS
    rows = _metrics(run_dir)
    first = sum(r["loss"] for r in rows[0]["rows"]) / 2
    last = sum(r["loss"] for r in rows[-1]["rows"]) / 2
    assert rows[-1]["step"] == 400 and last <= 0.7 * first


def test_every_logged_step_has_both_ranks_and_a_node_row(default_run):
    _, _, run_dir, _ = default_run
    for message in _metrics(run_dir):
        assert sorted(r["rank"] for r in message["rows"]) == [0, 1]
        assert len(message["nodes"]) == 1 and message["nodes"][0]["mfu"] > 0


def test_console_shows_metrics_lines_and_the_summary(default_run):
    result, _, run_dir, _ = default_run
    out = result.stdout
    assert "step    400 | loss" in out and "MFU/node" in out
    for heading in ("run summary", "per node", "tokens/s per worker", "resume with", str(run_dir)):
        assert heading in out
    assert "Traceback" not in result.stderr


def test_checkpoints_are_complete_and_latest_points_at_the_last(default_run):
    _, _, run_dir, _ = default_run
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000400"
    for tag in ("step_00000200", "step_00000400"):
        names = {p.name for p in (checkpoints / tag).iterdir()}
        assert {"COMPLETE", "mp_rank_00_model_states.pt", "longtrain_rank0.pt", "longtrain_rank1.pt"} <= names
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank0.log").is_file()
    assert not (run_dir / "logs" / "ray").exists()  # Ray's session logs are kept for runs that did not finish only


def test_resume_continues_the_run_from_its_latest_checkpoint(default_run):
    _, _, run_dir, cwd = default_run
    result, _ = _longtrain(["train.max_steps=410", "resume=auto"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000400'} at step 400" in result.stdout
    resumed = [m for m in _metrics(run_dir) if m["step"] > 400]
    assert [m["step"] for m in resumed] == [401, 410]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000410"
    assert not (run_dir / "checkpoints" / "step_00000200").exists()  # keep_last=2


def test_profile_mfu_reports_nodes_and_ranks_of_the_run(default_run, capsys):
    from launch.cli import main

    _, _, run_dir, _ = default_run
    assert main(["profile", "mfu", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "**node0/" in table and "| rank 0 |" in table and "| rank 1 |" in table
    assert (run_dir / "mfu_report.md").is_file() and (run_dir / "mfu_report.png").stat().st_size > 10_000
