"""`longtrain train plan.path=...` executes a plan (token-wise swap + recompute in the real DeepSpeed + Ray loop)
and, the technique being exact, reproduces the plain run's losses bit for bit. The runs compared with it are the
trainer's own without Ray (bit for bit what `longtrain train` computes, at a fraction of the cost)."""

import json
import subprocess
import sys

import pytest

from launch.cli import main
from spec.plan import load_plan
from tests.conftest import step_losses, train_without_ray

pytestmark = pytest.mark.slow
COMMON = ["train.max_steps=12", "optim.warmup_steps=2", "train.log_every_steps=4", "checkpoint.every_steps=0",
          "checkpoint.at_end=false", "plan.gpu_memory_fraction=0.003"]


def _train(cwd, *extra):
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *COMMON, *extra], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = [p for p in (cwd / "runs").iterdir() if p.name.startswith(extra[0].split("=")[1])]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_planned_run_equals_the_plain_run(tmp_path, capsys):
    plan_path = tmp_path / "cpu.plan.yaml"
    assert main(["plan", *COMMON, "--profile", "cpu", "--out", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "recompute" in out
    planned = _train(tmp_path, "run.name=planned", f"plan.path={plan_path}")
    plain = step_losses(train_without_ray(tmp_path / "plain", 2, COMMON))
    assert [m["step"] for m in planned] == [1, 4, 8, 12]
    assert step_losses(planned) == plain
    assert all(r["swap_host_gib"] > 0 for r in planned[-1]["rows"])
    arena_bytes = load_plan(plan_path).runtime_arena["arena_bytes"]  # the step rows report the plan's arena and
    # what missed it (nothing: the runtime lays out what the plan did)
    assert all(r["arena_gib"] == arena_bytes / 2**30 > 0 and r["arena_fallbacks"] == 0 for r in planned[-1]["rows"])


def test_a_plan_for_another_job_is_refused_in_one_line(tmp_path, capsys):
    plan_path = tmp_path / "p.yaml"
    assert main(["plan", *COMMON, "--profile", "cpu", "--out", str(plan_path)]) == 0
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *COMMON, "data.seq_len=512",
                             f"plan.path={plan_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "seq_len=256" in result.stderr and "re-plan" in result.stderr


def test_compression_and_token_elimination_on_one_split_layer_are_refused_before_ray_starts(tmp_path, capsys):
    """Each composes with the plan's split (tests/test_compression_swap.py, the test below); both on one layer not yet."""
    plan_path = tmp_path / "split.plan.yaml"
    section = ["token_elim.enabled=true", "data.seq_len=256", "token_elim.dense_first_layers=1"]
    assert main(["plan", *COMMON, *section, "--profile", "cpu", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    assert main(["train", *COMMON, f"plan.path={plan_path}", f"run.root={tmp_path}", *section,
                 "compression.linear_inputs=int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not compose there yet" in err and "token_elim" in err
    assert not any(tmp_path.glob("default-*"))  # refused before the run directory was made


def test_token_elimination_on_split_layers_trains_as_without_the_plan(tmp_path, capsys):
    """Sparse layers 1 and 2 under the plan's swap/recompute split: the losses of the same sparse job without a
    plan (within float tolerance: the attention norm's weight gradient sums in another order)."""
    elim = ["token_elim.enabled=true", "token_elim.keep_ratio=0.5", "token_elim.dense_first_layers=1",
            "data.seq_len=256", "train.max_steps=4", "train.log_every_steps=1"]
    plan_path = tmp_path / "elim.plan.yaml"
    assert main(["plan", *COMMON, *elim, "--profile", "cpu", "--out", str(plan_path)]) == 0
    assert "recompute" in capsys.readouterr().out
    planned = step_losses(train_without_ray(tmp_path / "planned", 2, [*COMMON, f"plan.path={plan_path}", *elim]))
    plain = step_losses(train_without_ray(tmp_path / "plain", 2, [*COMMON, *elim]))
    assert sorted(planned) == sorted(plain) == [1, 2, 3, 4]
    for step in plain:
        assert planned[step] == pytest.approx(plain[step], rel=1e-5)
