"""train.attention_kernel=auto: the profile's fastest kernel at the job's length, the same choice in the planner, the
plan check and the worker."""

import logging
from dataclasses import replace

import pytest
import torch

from orchestrator import attention
from planner.cost_model import CostModel
from spec import attention_choice
from spec.config import load_job_config
from spec.errors import ConfigError
from spec.hardware import load_profile
from spec.plan import plan_inputs

SHAPE = ["model.preset=llama-7b", "model.num_layers=4", "data.micro_batch_size=1", "cluster.num_workers=1"]
CROSSING = {"sdpa": {8192: 500.0, 131072: 470.0}, "fa4": {8192: 400.0, 131072: 536.0},
            "sdpa_flash": {8192: 600.0, 131072: 600.0}}
"""Rates that cross between the two lengths (and a faster SDPA backend `auto` must not pick: not a runnable kernel)."""


def crossing_profile():
    h200 = load_profile("h200")
    return replace(h200, measured=replace(h200.measured, attention_tflops_by_kernel=CROSSING,
                                          attention_kernel_speedup={}))


def job(seq_len: int, kernel: str = "auto"):
    return load_job_config(None, [*SHAPE, f"data.seq_len={seq_len}", f"train.attention_kernel={kernel}"])


def test_auto_takes_the_faster_kernel_at_each_length():
    profile = crossing_profile()
    assert attention_choice.choose("auto", 8192, profile)[0] == "sdpa"
    kernel, why = attention_choice.choose("auto", 131072, profile)
    assert kernel == "fa4" and "131,072 tokens" in why and "fa4 536" in why and "sdpa 470" in why
    assert attention_choice.choose("sdpa", 131072, profile)[0] == "sdpa"  # an explicit kernel is kept
    assert attention_choice.choose("fa4", 8192, profile)[0] == "fa4"


def test_auto_without_per_length_rates_uses_the_speedup_and_else_sdpa():
    h200 = load_profile("h200")  # attention_kernel_speedup fa4 1.14, no per-kernel table
    assert attention_choice.choose("auto", 4096, h200)[0] == "fa4"
    slower = replace(h200, measured=replace(h200.measured, attention_kernel_speedup={"fa4": 0.9}))
    assert attention_choice.choose("auto", 4096, slower)[0] == "sdpa"
    assert attention_choice.choose("auto", 4096, load_profile("cpu"))[0] == "sdpa"  # nothing else measured


def test_the_planner_prices_and_records_the_kernel_auto_picks():
    profile = crossing_profile()
    for seq_len, picked in ((8192, "sdpa"), (131072, "fa4")):
        auto, explicit = job(seq_len), job(seq_len, picked)
        assert CostModel(auto, profile).attention_tflops(seq_len) == CROSSING[picked][seq_len]
        assert plan_inputs(auto, profile, "bf16") == plan_inputs(explicit, profile, "bf16")
        assert CostModel(auto, profile).layer() == CostModel(explicit, profile).layer()


def test_the_worker_resolves_auto_logs_it_and_refuses_a_pick_that_cannot_run(caplog):
    profile = crossing_profile()
    with caplog.at_level(logging.INFO, logger="longtrain.model"):
        short = attention.resolved_kernel(job(8192), profile, torch.device("cpu"), torch.float32)
    assert short.train.attention_kernel == "sdpa"
    assert "attention kernel: sdpa (auto: fastest at 8,192 tokens" in caplog.text
    with pytest.raises(ConfigError, match=r"^train.attention_kernel=auto picked fa4 \(auto: fastest at 131,072 "
                                          r"tokens.*\) but FlashAttention-4 runs on CUDA GPUs"):
        attention.resolved_kernel(job(131072), profile, torch.device("cpu"), torch.float32)
    same = job(131072, "sdpa")
    assert attention.resolved_kernel(same, profile, torch.device("cpu"), torch.float32) is same
