"""A step with a non-finite loss or gradient norm (`train.on_nonfinite`): with `stop` the run ends in one line naming
the step and that step is never checkpointed; with `skip` the update is dropped (by DeepSpeed's own ZeRO 1-3
optimizer) and training goes on. Real DeepSpeed engines; the NaN comes from a forward hook on the embedding (one
rank, one step) or from an absurd learning rate, never from a mock."""

import re
import subprocess
import sys

import pytest

from orchestrator.nonfinite import describe
from spec.config import load_job_config
from tests.conftest import spawn_gloo

SMALL = ["model.num_layers=2", "data.seq_len=64", "data.micro_batch_size=2", "optim.warmup_steps=1"]


def test_describe_names_the_ranks_and_the_gradient_norm():
    nan, inf = float("nan"), float("inf")
    assert describe([(nan, inf), (1.0, inf)], dropped=True) == "loss nan (rank 0), gradient norm inf"
    assert describe([(nan, None), (inf, None)], dropped=False) == "loss nan (ranks 0, 1)"
    assert describe([(1.0, None)], dropped=True) == "non-finite gradients (DeepSpeed dropped the update)"


def _three_steps(rank, world, put, job, policy):
    """Steps 1-5 of a real engine (steps 1 and 2 run at the warm-up's learning rate 0: DeepSpeed's WarmupCosineLR
    warms up over at least 2 steps from 0); in step 4 the last rank's embedding output is NaN. Per step: (usable, weights changed, weights finite), and what rank 0 published."""
    import deepspeed
    import torch

    from orchestrator.data import RankSampler, build_windows
    from orchestrator.ds_config import deepspeed_config
    from orchestrator.metrics import StepMeter
    from orchestrator.model import LlamaModel
    from orchestrator.nonfinite import step_is_usable
    from orchestrator.trainer import _train_step

    torch.manual_seed(0)
    model = LlamaModel(job.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(job, False))
    sampler = RankSampler(build_windows(job.data, job.model.vocab_size, 0), job.data.micro_batch_size, rank, world, 0)
    meter = StepMeter(job.model, job.data.seq_len, 1.0, rank, "node0")
    published = []

    def weights():  # this rank's values (ZeRO-3 keeps only a partition, in ds_tensor, between steps)
        return [getattr(p, "ds_tensor", p).detach().clone() for p in model.parameters()]

    def step(number):
        before = weights()
        skipped = engine.skipped_steps
        loss = _train_step(engine, sampler, 1, meter, None)
        usable = step_is_usable(engine, number, loss, skipped, policy, published.append if rank == 0 else None)
        after = weights()
        return (usable, any(not torch.equal(a, b) for a, b in zip(before, after)),
                all(bool(torch.isfinite(p).all()) for p in after))

    results = [step(1), step(2), step(3)]
    hook = model.embed.register_forward_hook(lambda module, args, out: out * float("nan") if rank == world - 1 else out)
    results.append(step(4))
    hook.remove()
    results.append(step(5))
    put({"rank": rank, "steps": results, "published": published})


@pytest.mark.parametrize("zero_stage,world", [(2, 2), (3, 1)])
def test_skip_drops_the_update_on_every_rank_and_training_goes_on(zero_stage, world):
    job = load_job_config(None, [*SMALL, f"cluster.num_workers={world}", f"train.zero_stage={zero_stage}",
                                 "train.on_nonfinite=skip"])
    results = spawn_gloo(_three_steps, world, job, "skip")
    assert len(results) == world
    for result in results:  # the NaN was on the last rank only: every rank skips step 4, unchanged and finite
        assert result["steps"] == [(True, False, True)] * 2 + [(True, True, True), (True, False, True), (True, True, True)]
    (rank0,) = [r for r in results if r["rank"] == 0]
    (message,) = rank0["published"]
    assert message["kind"] == "nonfinite" and message["step"] == 4 and message["action"] == "skip"
    assert f"loss nan (rank {world - 1})" in message["why"]


def test_stop_is_decided_even_when_the_optimizer_applied_the_step():
    """ZeRO-0's optimizer applies a NaN step (the weights are lost): the run must stop there, before any checkpoint."""
    job = load_job_config(None, [*SMALL, "cluster.num_workers=1", "train.zero_stage=0"])
    (result,) = spawn_gloo(_three_steps, 1, job, "stop")
    assert result["steps"][2:4] == [(True, True, True), (False, True, False)]
    assert [(m["step"], m["action"]) for m in result["published"]] == [(4, "stop"), (5, "stop")]


def test_skip_needs_a_zero_stage_whose_optimizer_drops_the_step():
    with pytest.raises(Exception, match="on_nonfinite=skip needs train.zero_stage 1, 2 or 3"):
        load_job_config(None, ["train.on_nonfinite=skip", "train.zero_stage=0"])


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_and_checkpoints_nothing_after_it(tmp_path):
    """optim.lr=1e30: the gradients overflow within a few steps; checkpoints are written every step until then."""
    result = subprocess.run([sys.executable, "-m", "launch.cli", "train", *SMALL, "optim.lr=1e30", "train.max_steps=20",
                             "checkpoint.every_steps=1", "train.log_every_steps=1", "cluster.num_workers=1",
                             f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    stopped = int(re.search(r"^longtrain: stopped at step (\d+): .*(loss|gradient norm) (nan|inf)", line).group(1))
    assert "resume with: longtrain train" in line
    tags = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert tags and all(int(tag[5:]) < stopped for tag in tags)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{stopped - 1:08d}"
