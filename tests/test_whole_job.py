"""The whole job on one GPU: LoRA's and offload's memory in the planner, the host-memory refusal, the longest
sequence search, the ALST baseline's prediction, and the offload settings as DeepSpeed reads them."""

import pytest

from planner import whole_job
from planner.alst import predict_alst
from planner.cost_model import CostModel
from planner.planning import PlanInfeasible, make_plan
from spec.activations import MLP_INTERMEDIATES
from spec.config import load_job_config
from spec.flops import parameter_count
from spec.hardware import load_profile
from spec.plan import plan_inputs
from spec.units import GIB

LLAMA3_8B = ["model.preset=llama3-8b", "cluster.num_workers=1", "data.micro_batch_size=1", "data.source=synthetic"]


def _job(*overrides):
    return load_job_config(None, [*LLAMA3_8B, *overrides])


def _static(*overrides, zero_stage=2):
    job = _job(*overrides, f"train.zero_stage={zero_stage}")
    return CostModel(job, load_profile("h200_1x_lent"), "bf16").static_memory(zero_stage), job


def test_lora_keeps_a_frozen_bf16_base_and_a_tiny_optimizer():
    full, job = _static("data.seq_len=8192")
    lora, lora_job = _static("data.seq_len=8192", "model.lora.rank=16")
    base = parameter_count(job.model)
    adapters = whole_job.lora_parameter_count(lora_job.model)
    # rank 16 on all seven projections of Llama-3-8B: 16 x (q 8192 + k 5120 + v 5120 + o 8192 + 3 x 18432) x 32
    assert adapters == 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) * 32 == 41_943_040
    assert lora.parameters == 2 * (base + adapters)
    assert lora.gradients == 2 * adapters and lora.optimizer_states == 12 * adapters
    assert full.gradients == 2 * base and full.optimizer_states == 12 * base
    assert lora.optimizer_states < full.optimizer_states / 150
    # lora_B saves its rank-wide input whole: 7 adapters x 16 x 2 bytes per token per layer
    assert lora.adapter_activations == 7 * 16 * 2 * 8192 * 32


def test_offloaded_optimizer_leaves_the_gpu_and_takes_18_bytes_a_parameter_of_the_host_in_bf16():
    """DeepSpeed's host buffers (`planner.offload_host`, checked against a real engine in test_offload_host):
    fp32 master weights and gradients, a bf16 copy, Adam's two moments, and one bf16 buffer of the largest parameter;
    on a GPU each pinned one a power-of-two block."""
    static, job = _static("data.seq_len=8192", "model.preset=llama-1b", "train.offload.optimizer=true")
    assert static.gradients == 0 and static.optimizer_states == 0
    params, largest = parameter_count(job.model), job.model.vocab_size * job.model.hidden_size
    assert whole_job.host_static_bytes(job, 2, cuda=False) == 18 * params + 2 * largest
    assert whole_job.host_static_bytes(job, 2, cuda=True) > 1.1 * whole_job.host_static_bytes(job, 2, cuda=False)
    params_offloaded, _ = _static("data.seq_len=8192", "model.preset=llama-1b", "train.offload.optimizer=true",
                                  "train.offload.params=true", zero_stage=3)
    assert params_offloaded.parameters == 2 * min(whole_job.MAX_LIVE_PARAMETERS, params)
    two = load_job_config(None, [*LLAMA3_8B, "model.preset=llama-1b", "cluster.num_workers=2",
                                 "train.offload.optimizer=true"])
    split = 9 * params + 2 * largest  # the partition's buffers split over the ZeRO ranks, the staging buffer not
    assert whole_job.host_static_bytes(two, 2, cuda=False) == pytest.approx(split, abs=64)


def test_full_fine_tuning_of_8b_with_the_optimizer_offloaded_is_refused_for_128_gib_of_host_in_one_line():
    job = _job("data.seq_len=8192", "train.offload.optimizer=true")
    with pytest.raises(PlanInfeasible) as refused:
        make_plan(job, load_profile("h200_1x_lent"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("does not fit the host memory")
    assert "140.8 GiB per GPU" in message and "at least 176 GiB" in message and "128 GiB" in message


def test_the_host_memory_source_is_said_and_plan_host_memory_gib_overrides_the_profile():
    profile = load_profile("h200")
    assert "datasheet" in whole_job.host_memory(_job(), profile).source
    job = _job("plan.host_memory_gib=128")
    assert whole_job.host_memory(job, profile).gib == 128
    assert whole_job.host_budget_bytes(job, profile) == 128 * GIB * 0.8
    assert plan_inputs(job, profile, "bf16")["host_memory_gib"] == 128


def test_plain_jobs_plan_inputs_carry_none_of_the_new_keys():
    inputs = plan_inputs(load_job_config(None, []), load_profile("cpu"), "fp32")
    assert not {"lora", "offload", "tiled_mlp", "host_memory_gib"} & set(inputs)


def test_a_tiled_mlp_saves_no_mlp_intermediate_and_shrinks_the_layer_working_set():
    profile = load_profile("h200_1x_lent")
    plain = CostModel(_job("data.seq_len=131072"), profile, "bf16").layer()
    tiled = CostModel(_job("data.seq_len=131072", "train.tiled_mlp=true"), profile, "bf16").layer()
    assert not {t.name for t in tiled.tensors} & set(MLP_INTERMEDIATES)
    assert tiled.token_wise_bytes < plain.token_wise_bytes / 3
    assert tiled.backward_seconds > plain.backward_seconds  # the MLP's forward once more
    assert tiled.mlp_tile_bytes == 4096 * 14336 * 2


def test_alst_keeps_every_layer_input_but_the_newest_on_the_host():
    job = _job("data.seq_len=131072", "model.lora.rank=16", "train.activation_checkpointing=alst",
               "train.zero_stage=3")
    prediction = predict_alst(job, load_profile("h200_1x_lent"))
    assert prediction.host_gib == pytest.approx(31 * 131072 * 4096 * 2 / GIB)  # the newest is never offloaded
    assert prediction.fits and prediction.binding().startswith("host memory")


@pytest.mark.slow
def test_max_seq_finds_the_longest_planned_sequence_and_names_what_binds():
    from planner.longest import longest_line, longest_sequence

    job = _job("data.seq_len=65536", "model.lora.rank=16", "train.tiled_mlp=true")
    profile = load_profile("h200_1x_lent")
    longest = longest_sequence(job, profile)
    line = longest_line(job, profile, longest)
    assert "\n" not in line and "binding at" in line and f"data.seq_len={longest.seq_len}" in line
    assert 524288 < longest.seq_len < 1048576  # 632K since layers may be replayed whole (333K before)
    assert make_plan(_job(f"data.seq_len={longest.seq_len}", "model.lora.rank=16", "train.tiled_mlp=true"), profile)
    with pytest.raises(PlanInfeasible):
        make_plan(_job(f"data.seq_len={longest.seq_len + 64}", "model.lora.rank=16", "train.tiled_mlp=true"), profile)


def test_offload_settings_reach_deepspeed_as_its_documentation_names_them():
    """zero_optimization.offload_optimizer / offload_param with device cpu and pin_memory, read by DeepSpeed's own
    config class; torch_adam off so DeepSpeed picks its CPU Adam for the offloaded optimizer."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    from orchestrator.ds_config import deepspeed_config

    job = load_job_config(None, ["train.zero_stage=3", "train.offload.optimizer=true", "train.offload.params=true",
                                 "cluster.num_workers=1"])
    config = deepspeed_config(job, use_cuda=False)
    zero = DeepSpeedConfig(config).zero_config
    assert zero.offload_optimizer.device == OffloadDeviceEnum.cpu and zero.offload_optimizer.pin_memory
    assert zero.offload_param.device == OffloadDeviceEnum.cpu and zero.offload_param.pin_memory
    assert config["optimizer"]["params"]["torch_adam"] is False
    plain = deepspeed_config(load_job_config(None, []), use_cuda=False)
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["optimizer"]["params"]["torch_adam"]


def test_config_rules_for_offload_lora_and_alst_are_one_line_each():
    from spec.errors import ConfigError

    for overrides, words in ((["train.offload.params=true"], "needs train.zero_stage=3"),
                             (["train.zero_stage=0", "train.offload.optimizer=true"], "zero_stage 1, 2 or 3"),
                             (["train.activation_checkpointing=alst", "train.zero_stage=3"], "frozen LoRA base"),
                             (["model.lora.rank=8", "model.lora.target_modules=[qproj]"], "target_modules"),
                             (["train.tiled_mlp=true", "compression.silu=int8"], "does not compose")):
        with pytest.raises(ConfigError, match=words) as refused:
            load_job_config(None, overrides)
        assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_parameter_offload_builds_under_zero_init_and_trains_like_plain_zero3(tmp_path):
    """train.offload.params: the model is made under deepspeed.zero.Init (partitioned as it is built, into host
    memory), initialised again one gathered parameter at a time (zero.Init empties them before the model's own
    initialisation runs), and trains with DeepSpeed's offload_param like plain ZeRO-3 (within 1e-4 on the CPU: not
    bit for bit; the losses were 124 instead of 5.6 before the re-initialisation)."""
    from tests.conftest import spawn_gloo, train_rank

    def losses(name, *overrides):
        job = load_job_config(None, ["cluster.num_workers=1", "train.max_steps=4", "train.log_every_steps=1",
                                     "optim.warmup_steps=1", "checkpoint.every_steps=0", "checkpoint.at_end=false",
                                     "data.seq_len=128", "data.micro_batch_size=2", "train.zero_stage=3", *overrides])
        messages = spawn_gloo(train_rank, 1, job, str(tmp_path / name))
        return [m["rows"][0]["loss"] for m in messages if m["kind"] == "step"]

    plain = losses("plain")
    offloaded = losses("offload", "train.offload.params=true")
    assert len(plain) == 4 and offloaded == pytest.approx(plain, rel=1e-4)


def test_the_driver_refuses_a_plan_or_an_alst_job_that_does_not_fit_this_machines_host_memory(tmp_path):
    """A plan made for the h200 datasheet's 2 TB host swaps more than a 64 GiB machine holds: one line before Ray
    starts, naming the fix; the ALST recipe's layer inputs likewise."""
    from launch.host_check import check_host_memory
    from spec.plan import PlanError, save_plan

    overrides = ["data.seq_len=262144", "model.lora.rank=16", "train.tiled_mlp=true"]
    plan = make_plan(_job(*overrides), load_profile("h200")).plan
    save_plan(plan, tmp_path / "p.yaml")
    job = _job(*overrides, f"plan.path={tmp_path / 'p.yaml'}")
    check_host_memory(job, plan.predicted["host_gib"] + 1)
    with pytest.raises(PlanError, match="re-plan with plan.host_memory_gib=64") as refused:
        check_host_memory(job, 64.0)
    assert "\n" not in str(refused.value)
    alst = _job("data.seq_len=524288", "model.lora.rank=16", "train.activation_checkpointing=alst", "train.zero_stage=3",
                "train.precision=bf16")
    with pytest.raises(PlanError, match=r"needs 128\.0 GiB \(every layer's input"):
        check_host_memory(alst, 125.0)
