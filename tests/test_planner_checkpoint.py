"""The planner's whole-layer checkpoint (`LayerPlan.checkpoint_layer`): the MIP picks it when memory is short and
not when it is not, a plan trains at the ALST recipe's longest sequence (its feasible set holds ALST's choice),
`longtrain plan` shows it, and plan files of version 2 still load."""

import re
from dataclasses import replace

import pytest
import yaml

from planner.alst import predict_alst
from planner.longest import longest_sequence
from planner.planning import _solve, make_plan
from planner.policy import solve_policy
from planner.report import plan_summary
from spec.config import load_job_config
from spec.hardware import load_profile
from spec.plan import PLAN_VERSION, load_plan, save_plan

LLAMA3_8B_LORA = ["model.preset=llama3-8b", "model.lora.rank=16", "model.lora.alpha=32", "data.micro_batch_size=1",
                  "cluster.num_workers=1", "metrics.hardware_profile=h200_1x_lent"]
FOUR_LAYERS = [*LLAMA3_8B_LORA, "model.num_layers=4", "train.tiled_mlp=true", "plan.host_memory_gib=16"]


@pytest.fixture(scope="module")
def profile():
    return load_profile("h200_1x_lent")


def _plan(profile, *overrides):
    return make_plan(load_job_config(None, [*FOUR_LAYERS, *overrides]), profile).plan


def test_the_mip_checkpoints_whole_layers_only_when_memory_is_short(profile):
    """4 Llama-3-8B layers on one H200, 16 GiB of host memory: at 128K everything stays; at 1M no policy of the
    token-wise split fits (a layer keeps its input and attention output at the least, 16 KB a token) and the MIP
    replays layers whole (layer 0 first: replayed, it keeps nothing, its input is looked up again)."""
    ample = _plan(profile, "data.seq_len=131072")
    assert not any(layer.checkpoint_layer for layer in ample.layers)
    short_job = load_job_config(None, [*FOUR_LAYERS, "data.seq_len=1048576"])
    short = make_plan(short_job, profile).plan
    replayed = [layer for layer in short.layers if layer.checkpoint_layer]
    assert len(replayed) >= 2 and short.layers[0].checkpoint_layer
    assert all((layer.keep_fraction, layer.swap_fraction, layer.recompute_fraction) == (0.0, 0.0, 1.0)
               for layer in replayed)
    assert short.predicted["peak_gpu_gib"] <= short.predicted["gpu_budget_gib"]
    _, _, inputs, _ = _solve(short_job, profile)
    assert not solve_policy(replace(inputs, checkpoint_block_bytes=[]), 5).feasible
    names = {entry["name"] for entry in short.layout}
    assert {"layer_block", "layer_block@bwd", "head_and_loss"} <= names


def test_a_plan_trains_at_1_5x_the_alst_recipes_longest_sequence(profile):
    """The issue-18 job: ALST's longest is bound by host memory (every layer's input there, each pinned by DeepSpeed
    in a power-of-two block: 2 GiB up to 256K tokens, 4 GiB past it); the plan's MIP can make ALST's choice (layers
    replayed whole, inputs to the host) and more, so it plans at 1.5x that length, replaying whole layers."""
    alst = load_job_config(None, [*LLAMA3_8B_LORA, "train.activation_checkpointing=alst", "train.zero_stage=3",
                                  "data.seq_len=131072"])
    longest = longest_sequence(alst, profile).seq_len
    assert longest == 262144
    alst.data.seq_len = longest
    assert predict_alst(alst, profile).fits
    plan = make_plan(load_job_config(None, [*LLAMA3_8B_LORA, "train.tiled_mlp=true",
                                            f"data.seq_len={longest * 3 // 2}"]), profile).plan
    assert any(layer.checkpoint_layer for layer in plan.layers)
    assert plan.predicted["host_gib"] <= plan.predicted["host_budget_gib"]


def test_the_report_and_the_plan_file_say_which_layers_are_replayed(profile, tmp_path):
    plan = _plan(profile, "data.seq_len=1048576")
    summary = plan_summary(plan, tmp_path / "p.yaml", tmp_path / "p.png", 0.1)
    first = next(layer.layer for layer in plan.layers if layer.checkpoint_layer)
    assert re.search(rf"\n +{first}-\d+ +whole layer replayed +(gpu|host) ", summary)
    assert "keeps only its input" in summary
    save_plan(plan, tmp_path / "p.yaml")
    loaded = load_plan(tmp_path / "p.yaml")
    assert loaded.version == PLAN_VERSION == 3
    assert [layer.checkpoint_layer for layer in loaded.layers] == [layer.checkpoint_layer for layer in plan.layers]
    assert any(layer.checkpoint_layer for layer in loaded.layers)


def test_a_version_2_plan_file_migrates_with_no_layer_replayed(profile, tmp_path):
    plan = _plan(profile, "data.seq_len=131072")
    data = plan.to_dict()
    data["version"] = 2
    for layer in data["layers"]:
        del layer["checkpoint_layer"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = load_plan(path)
    assert loaded.version == 3 and loaded.inputs_hash == plan.inputs_hash
    assert not any(layer.checkpoint_layer for layer in loaded.layers)
