"""The Python API (`import longtrain`): the functions the CLI calls, returning typed results; the CLI prints their
summaries. Training through the API is run by tests/test_tracking.py's real run. About 5 s."""

import pytest

import longtrain
from launch import api
from spec.plan import load_plan


def test_the_package_re_exports_the_functions_the_cli_calls():
    for name in ("load_config", "plan", "longest_sequence", "dry_run", "train"):
        assert getattr(longtrain, name) is getattr(api, name)
        assert getattr(longtrain, name).__doc__


def test_plan_returns_the_plan_it_wrote(tmp_path):
    result = longtrain.plan("configs/llama7b_1m_8xa800.yaml", out=str(tmp_path / "memo.yaml"))
    assert isinstance(result, longtrain.PlanResult) and result.plan_path == tmp_path / "memo.yaml"
    assert result.png_path.is_file() and load_plan(result.plan_path).predicted == result.plan.predicted
    assert result.plan.predicted["peak_gpu_gib"] <= result.plan.predicted["gpu_budget_gib"]
    assert str(result.plan_path) in result.summary  # what `longtrain plan` prints (tests/test_readme_commands.py)


def test_an_alst_job_is_a_prediction_without_a_plan_file(tmp_path):
    result = longtrain.plan(None, ["model.preset=llama-1b", "data.seq_len=16384", "cluster.num_workers=1",
                                   "train.activation_checkpointing=alst", "train.zero_stage=3",
                                   "train.offload.optimizer=true", "data.micro_batch_size=1"],
                            profile="h100_sxm", out=str(tmp_path / "x.yaml"))
    assert result.plan is None and result.plan_path is None and result.alst.peak_gpu_gib > 0
    assert not (tmp_path / "x.yaml").exists()


def test_longest_sequence_and_dry_run_and_load_config(tmp_path):
    longest = longtrain.longest_sequence(None, ["model.preset=llama-7b"], profile="h100_sxm")  # 2 GPUs: 3328
    assert longest.seq_len > 0 and longest.seq_len % 64 == 0 and f"data.seq_len={longest.seq_len}" in longest.summary
    checked = longtrain.dry_run(None, ["data.seq_len=512", f"run.root={tmp_path}"])
    assert not checked.continuing and checked.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert not any(tmp_path.iterdir())  # a dry run creates nothing
    assert longtrain.load_config(None, ["data.seq_len=512"]).data.seq_len == 512
    with pytest.raises(longtrain.LongtrainError, match="model.num_layrs"):
        longtrain.load_config(None, ["model.num_layrs=3"])
