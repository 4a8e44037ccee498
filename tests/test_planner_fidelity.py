"""The planner's picture of the machine: host memory from where it was measured (and said), Ulysses' all-to-all in
the step time, and the last layer's host copies, which nothing hides (MEMO's rule)."""

import dataclasses
from pathlib import Path

import pytest

from launch.host_check import check_cluster_host_memory, node_host_memory_gib
from planner.cost_model import CostModel
from planner.planning import make_plan
from planner.policy import exposed_copy_seconds, given_copies, last_layer_fetch_seconds, policy_inputs
from planner.report import plan_summary
from spec.config import load_job_config
from spec.hardware import load_profile
from spec.plan import LayerPlan, PlanError, save_plan
from spec.units import GIB

ULYSSES = ["model.preset=llama-7b", "model.num_layers=2", "data.seq_len=131072", "data.micro_batch_size=1",
           "data.source=synthetic",
           "cluster.num_workers=4", "parallel.sp_degree=4", "train.zero_stage=3"]
SPLIT = ULYSSES + ["data.seq_len=524288", "plan.gpu_memory_fraction=0.3"]
"""128K tokens a GPU in 42 GiB: the plan splits the layers and puts activations in host memory."""


def _without_alltoall(profile):
    measured = dataclasses.replace(profile.measured, alltoall_busbw_gbps=None, derived={})
    return dataclasses.replace(profile, measured=measured)


def test_ulysses_all_to_all_is_counted_in_each_layer_pass():
    job = load_job_config(None, ULYSSES)
    profile = load_profile("h200_x4_lent")
    with_exchange, without = CostModel(job, profile), CostModel(job, _without_alltoall(profile))
    tokens, width = 131072 // 4, 4 * 4096  # q, k, v and the output, 2 bytes each, 3/4 of them leave this GPU
    assert with_exchange.exchange_bytes() == tokens * width * 2 * 3 / 4
    exchange = with_exchange.exchange_bytes() / 200e9
    a, b = with_exchange.layer(), without.layer()
    assert a.forward_seconds - b.forward_seconds == pytest.approx(exchange)
    assert a.backward_seconds - b.backward_seconds == pytest.approx(exchange)
    assert a.recompute_seconds == b.recompute_seconds  # token-wise recomputation runs no attention
    one_gpu = CostModel(load_job_config(None, ULYSSES[:5] + ["cluster.num_workers=1"]), profile)
    assert one_gpu.exchange_seconds() == 0 and one_gpu.alltoall_source() == ""


def test_a_split_layer_pays_one_more_exchange_and_the_plan_says_where_the_bandwidth_comes_from(tmp_path):
    job = load_job_config(None, SPLIT)
    profile = load_profile("h200_x4_lent")
    outcome = make_plan(job, profile)
    passes = [2 + (not d.is_plain) + d.checkpoint_layer for d in outcome.plan.layers]
    exchange = outcome.cost.layer().exchange_seconds
    alltoall = outcome.plan.predicted["alltoall"]
    assert alltoall["seconds_per_step"] == pytest.approx(sum(passes) * exchange, rel=1e-4)
    assert any(p == 3 for p in passes)
    assert "derived from measured runs, not measured" in alltoall["source"]
    without = make_plan(job, _without_alltoall(profile)).plan.predicted
    assert "not counted" in without["alltoall"]["source"] and without["alltoall"]["seconds_per_step"] == 0
    assert outcome.plan.predicted["step_seconds"] >= without["step_seconds"] + alltoall["seconds_per_step"] - 1e-3
    save_plan(outcome.plan, tmp_path / "p.yaml")
    summary = plan_summary(outcome.plan, tmp_path / "p.yaml", tmp_path / "p.png", 0.0)
    assert "all-to-all" in summary and "measured.derived" in summary


def test_the_derived_all_to_all_figure_follows_from_the_run_it_names():
    """h200_x4_lent's all-to-all bandwidth is derived from the 4 x H200 Ulysses run (DeepSpeed's recipe: every
    layer replayed, 3 passes a layer): its measured step less the model's step without the all-to-all bounds the
    exchange time; the figure must still follow from today's model (re-derive it when the model changes)."""
    profile = load_profile("h200_x4_lent")
    why = profile.measured.derived["alltoall_busbw_gbps"]
    run = Path(why.split(" ")[0])
    assert run.is_file() and "43.29 s" in run.read_text()  # the recipe's steady step
    job = load_job_config("configs/llama7b8l_512k_4xh200.yaml", [])
    cost = CostModel(job, _without_alltoall(profile))
    layer = cost.layer()
    predicted = job.model.num_layers * (2 * layer.forward_seconds + layer.backward_seconds) + 3 * cost.head_seconds()
    moved = job.model.num_layers * 3 * CostModel(job, profile).exchange_bytes()
    derived_gbps = moved / (43.29 - predicted) / 1e9
    assert derived_gbps == pytest.approx(profile.measured.alltoall_busbw_gbps, rel=0.05)
    for name in ("h200", "h100_sxm", "a800", "a100_80g"):  # the other multi-GPU profiles say they are derived too
        assert "alltoall_busbw_gbps" in load_profile(name).measured.derived


def test_the_last_layers_copies_are_not_hidden():
    """MEMO's rule: the last layer's copy back starts when its own backward does (nothing to hide behind); its copy
    out is not waited for (the backward reads what is still on the device), so what comes back is what the LM head's
    forward and backward let the copy out finish. The MIP prices the whole copy back; the layer before hides behind
    the last one."""
    job = load_job_config("configs/llama7b4l_128k_1xh100.yaml", [])
    cost = CostModel(job, load_profile(job.metrics.hardware_profile))
    p = policy_inputs(cost, job.train.zero_stage, 0)
    n, moved = p.num_layers, 4e9
    copy = moved / p.pcie_bytes_per_second
    assert exposed_copy_seconds(p, n - 1, moved, 0, backward=True) == pytest.approx(copy)
    assert exposed_copy_seconds(p, n - 1, moved, 0, backward=False) == 0.0
    assert exposed_copy_seconds(p, n - 2, moved, 0, backward=True) == pytest.approx(
        copy - p.swap_hidden_fraction * p.backward_seconds[n - 1])
    assert last_layer_fetch_seconds(p, moved) == pytest.approx(min(copy, 3 * p.head_seconds))
    assert last_layer_fetch_seconds(p, 1e12) == pytest.approx(3 * p.head_seconds)  # the rest read where it is
    swap_last = [LayerPlan(layer=i, keep_fraction=float(i < n - 1), swap_fraction=float(i == n - 1),
                           recompute_fraction=0.0) for i in range(n)]
    stalls, _ = given_copies(p, swap_last)
    assert stalls == pytest.approx(last_layer_fetch_seconds(p, p.token_wise_bytes[n - 1]))


def test_a_plan_says_where_its_host_memory_comes_from(tmp_path):
    job = load_job_config(None, ["model.preset=debug", "data.seq_len=512", "cluster.num_workers=1"])
    for profile, said in (("cpu", "datasheet value"),
                          ("h100_sxm_measured", "measured by `longtrain profile hardware`")):
        plan = make_plan(job, load_profile(profile)).plan
        summary = plan_summary(plan, tmp_path / "p.yaml", tmp_path / "p.png", 0.0)
        lines = [line for line in summary.splitlines() if line.strip().startswith("host memory")]
        assert len(lines) == 1 and said in lines[0], summary


def _node(address: str, memory_gib: float, gpus: int = 4):
    """One entry of `ray.nodes()` as Ray reports it (memory 70% / object store 30% of what was free at start)."""
    return {"Alive": True, "NodeManagerAddress": address,
            "Resources": {"CPU": 64.0, "GPU": float(gpus), "memory": 0.7 * memory_gib * GIB,
                          "object_store_memory": 0.3 * memory_gib * GIB}}


def test_a_cluster_run_checks_the_host_memory_of_the_nodes_its_workers_land_on(tmp_path):
    job = load_job_config(None, SPLIT + ["train.offload.optimizer=true", "cluster.address=auto",
                                         "cluster.use_gpu=true"])
    outcome = make_plan(job, load_profile("h200_x4_lent"))
    save_plan(outcome.plan, tmp_path / "p.yaml")
    job.plan.path = str(tmp_path / "p.yaml")
    per_gpu = outcome.plan.predicted["host_gib"]
    assert per_gpu > 1  # the offloaded optimizer, and whatever activations the plan swaps
    assert node_host_memory_gib(_node("a", 512)["Resources"]) == pytest.approx(512)
    check_cluster_host_memory(job, [_node("10.0.0.1", 4 * per_gpu + 1)], use_gpu=True)
    small = int(4 * per_gpu - 1)
    with pytest.raises(PlanError) as refused:
        check_cluster_host_memory(job, [_node("10.0.0.1", 512), _node("10.0.0.2", small)], use_gpu=True)
    message = str(refused.value)
    assert "\n" not in message and "Ray node 10.0.0.2" in message and f"re-plan with plan.host_memory_gib={small}" \
        in message
    check_cluster_host_memory(job, [_node("10.0.0.2", small, gpus=0)], use_gpu=True)  # no worker lands there


def test_the_fitted_layer_reproduces_each_measured_layer_rate():
    """The profile's layer rates (a Llama-7B layer at 16K and 64K) are met at each length, not on average: the
    extras are per token, the attention's in-place factor per attention FLOP. One factor on the whole layer (the
    model before) missed each length by 6-7% and carried its 16K-64K average onto a 256K layer's attention."""
    from planner.cost_model import fitted_layer_overhead
    from spec.config import MODEL_PRESETS, ModelConfig
    from spec.flops import attention_forward_flops_per_token, layer_matmul_params

    profile = load_profile("h200_1x_lent")
    measured = profile.measured
    for seq, layer_tflops in measured.layer_fwd_bwd_tflops_by_seq_len.items():
        job = load_job_config(None, ["model.preset=llama-7b", f"data.seq_len={seq}", "data.micro_batch_size=1",
                                     "cluster.num_workers=1"])
        layer = CostModel(job, profile).layer()
        flops = 2 * layer_matmul_params(job.model) + attention_forward_flops_per_token(job.model, seq)
        seconds = 3 * flops * seq / (layer_tflops * 1e12)
        assert layer.forward_seconds + layer.backward_seconds == pytest.approx(seconds, rel=1e-6)
    overhead = fitted_layer_overhead(profile)
    assert 1.0 < overhead.attention_factor < 1.1 and overhead.seconds_per_token > 0
    # the extras follow the tokens: twice the sequence, twice the per-token part (matmuls and extras)
    model = ModelConfig(**MODEL_PRESETS["llama3-8b"])
    assert overhead.forward_seconds_per_token(model, 2) > overhead.forward_seconds_per_token(
        ModelConfig(**MODEL_PRESETS["llama-7b"]), 2)  # wider MLP: more bytes a token


LLAMA3_RUNS = Path("profiles/runs")
LLAMA3_MEASURED = [  # plan file (2026-12-01), its extra overrides, the measured rows and the step they time
    ("h200_2026-12-01_llama3-8b-1gpu/longtrain_128k", 131072, [], "h200_2026-12-01_llama3-8b-1gpu/longtrain_128k", 2),
    ("h200_2026-12-01_llama3-8b-1gpu/longtrain_256k", 262144, [], "h200_2026-12-02_llama3-8b-1gpu/longtrain_256k", 2),
    ("h200_2026-12-01_llama3-8b-1gpu/longtrain_320k", 327680,
     ["plan.gpu_memory_fraction=0.55", "plan.host_memory_fraction=0.42"],
     "h200_2026-12-02_llama3-8b-1gpu/longtrain_320k", 1),
]


def _llama3_job(recipe, seq_len, extra=()):
    import docs.probes.llama3_8b_1gpu as probe
    overrides = probe.overrides(recipe, seq_len, 1, "", False) + list(extra)
    return load_job_config(None, [o for o in overrides if not o.startswith("train.stop_at_step")])


def _measured_row(name, step):
    import json
    rows = [json.loads(line) for line in (LLAMA3_RUNS / f"{name}.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == step)


@pytest.mark.parametrize("plan_name, seq_len, extra, rows, step", LLAMA3_MEASURED)
def test_the_llama3_8b_plans_that_ran_on_a_lent_h200_are_predicted_within_the_targets(plan_name, seq_len, extra,
                                                                                      rows, step):
    """Issue 18's targets (step time within 10%, peak GPU within 5%, host within 10%) for the plans that ran, each
    predicted by today's model with its own decisions (`predict_decisions`). ~1 s each."""
    from planner.planning import predict_decisions
    from spec.plan import load_plan

    plan = load_plan(LLAMA3_RUNS / f"{plan_name}.plan.yaml")
    predicted = predict_decisions(_llama3_job("longtrain", seq_len, extra), load_profile("h200_1x_lent"),
                                  plan.layers).predicted
    row = _measured_row(rows, step)
    assert predicted["step_seconds"] == pytest.approx(row["step_seconds"], rel=0.10)
    assert predicted["peak_gpu_gib"] == pytest.approx(row["peak_allocated_gib"], rel=0.05)
    assert predicted["host_gib"] == pytest.approx(row["swap_host_gib"], rel=0.10)


def test_the_alst_peak_counts_the_inputs_deepspeeds_offload_engine_keeps_on_the_gpu():
    """DeepSpeed's checkpoint offload keeps the newest layer input and the last one offloaded on the GPU (keep_last,
    forward stash): two inputs beside the replayed layer at 256K, 4 GiB the model missed (45.92 GiB measured on a
    lent H200 against 41.30 predicted)."""
    from planner.alst import predict_alst

    profile = load_profile("h200_1x_lent")
    for seq_len, rows, step in ((131072, "h200_2026-12-01_llama3-8b-1gpu/alst_128k", 2),
                                (262144, "h200_2026-12-02_llama3-8b-1gpu/alst_256k", 1)):
        prediction = predict_alst(_llama3_job("alst", seq_len), profile)
        row = _measured_row(rows, step)
        assert prediction.peak_gpu_gib == pytest.approx(row["peak_allocated_gib"], rel=0.05)
        assert prediction.host_gib == pytest.approx(row["host_rss_gib"], rel=0.10)


def test_a_replayed_layer_0_keeps_nothing_of_its_input_unless_zero_3():
    """Layer 0's input is the embedding's output: replayed whole, the runtime looks the ids up again, so the plan
    counts no bytes for it (GPU or host), only the lookup's output during its own backward; under ZeRO-3 the
    runtime keeps it and the plan counts it."""
    from planner.planning import predict_decisions
    from spec.plan import LayerPlan

    profile = load_profile("h200_1x_lent")
    for stage in (2, 3):
        job = _llama3_job("longtrain", 262144, [f"train.zero_stage={stage}"])
        cost = CostModel(job, profile, "bf16")
        inputs = policy_inputs(cost, stage, 0)
        assert (inputs.input_bytes[0] == 0) == (stage < 3) and inputs.input_bytes[1] == 262144 * 4096 * 2
    decisions = [LayerPlan(i, 0.0, 0.0, 1.0, offload_skeletal=True, checkpoint_layer=True) for i in range(32)]
    plan = predict_decisions(_llama3_job("longtrain", 262144), profile, decisions)
    assert plan.predicted["host_gib"] == pytest.approx(31 * 2.0, abs=0.01)  # 31 inputs of 2 GiB; layer 0's none
    again = [b for b in plan.layout if b["name"] == "input_again"]
    assert [(b["layer"], b["size_bytes"]) for b in again] == [(0, 262144 * 4096 * 2)]


def _swapped_bytes_live(decisions):
    """Per level-2 event, the device bytes the layout holds for each layer's swapped tokens (staging both ways)."""
    from launch.measure.calibration import bench_job
    from planner.schedule import step_buffers

    layer = CostModel(bench_job(len(decisions), 32768, "llama-7b", []), load_profile("h200")).layer()
    buffers = step_buffers([layer] * len(decisions), decisions, 1, 0.0, [1.0] * len(decisions))
    staging = [b for b in buffers if "staging" in b.name]
    events = range(2 * len(decisions) + 2)
    swapping = {b.layer for b in staging}
    return layer, {t: {i: sum(s.size_bytes for s in staging if s.layer == i and s.start <= t < s.end)
                       for i in swapping} for t in events}


def test_a_layer_swapped_whole_is_counted_once_at_every_moment():
    """Its copy out reads the forward's own tensors (the layer block's in that forward), the last layer's backward
    reads the sources still held (no prefetch beside them), and a whole-swapped layer's fetched bytes are its
    restored tensors (the block's in its backward) but the attention group's. Counting them twice over-predicted a
    3-layer 256K row that swaps every token by 16% on a lent H200."""
    n = 3
    whole = [LayerPlan(layer=i, keep_fraction=0.0, swap_fraction=1.0, recompute_fraction=0.0) for i in range(n)]
    layer, live = _swapped_bytes_live(whole)
    swapped = layer.token_wise_bytes
    for t, per_layer in live.items():
        for i, held in per_layer.items():
            assert held <= swapped * 1.001, (t, i)
            if t == i:  # its own forward
                assert held == 0, (t, i)
            if t == 2 * n - i:  # its own backward: the attention group's share only
                assert 0 < held < 0.5 * swapped, (t, i)
    half = [LayerPlan(layer=i, keep_fraction=0.5, swap_fraction=0.5, recompute_fraction=0.0) for i in range(n)]
    layer, live = _swapped_bytes_live(half)  # a slice is copied to its own block first: counted in its forward
    assert all(live[i][i] > 0 for i in range(n))
