"""The DeepSpeed config dict generated from the job, and its escape hatch."""

from spec.config import load_job_config
from orchestrator.ds_config import deepspeed_config


def test_generated_config_follows_the_job():
    job = load_job_config(None, ["train.zero_stage=3", "train.grad_accum_steps=4", "optim.lr=1e-4"])
    config = deepspeed_config(job, use_cuda=False)
    assert config["zero_optimization"]["stage"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["optimizer"]["params"]["lr"] == 1e-4
    assert config["bf16"]["enabled"] is False
    assert config["scheduler"]["params"]["total_num_steps"] == job.train.max_steps


def test_bf16_on_gpu_by_default():
    assert deepspeed_config(load_job_config(), use_cuda=True)["bf16"]["enabled"] is True


def test_deepspeed_extra_is_merged_last_and_deeply():
    job = load_job_config(None, ["train.deepspeed_extra.zero_optimization.reduce_bucket_size=1000",
                                 "train.deepspeed_extra.flops_profiler.enabled=true"])
    config = deepspeed_config(job, use_cuda=False)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert config["zero_optimization"]["stage"] == 2
    assert config["flops_profiler"] == {"enabled": True}
