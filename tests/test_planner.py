"""The planner: layout MIP properties on random instances, policy behaviour, plan files, `longtrain plan`."""

import random
import time

import pytest

from launch.cli import main
from spec.config import list_shipped_configs, load_job_config
from spec.hardware import load_profile
from planner.layout import Buffer, lower_bound, solve_layout
from spec.plan import ALIGN_BYTES, LayerPlan, PlanError, check_plan_matches, load_plan, plan_inputs, save_plan
from planner.planning import PlanInfeasible, make_plan
from planner.report import plan_summary


def _random_buffers(rng: random.Random, count: int, horizon: int):
    buffers = []
    for i in range(count):
        start = rng.randrange(horizon)
        buffers.append(Buffer(f"t{i}", -1, ALIGN_BYTES * rng.randint(1, 8), start,
                              rng.randint(start + 1, horizon + 1)))
    return buffers


def _assert_no_live_overlap(buffers):
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if a.overlaps_in_time(b):
                assert a.offset_bytes + a.size_bytes <= b.offset_bytes or \
                    b.offset_bytes + b.size_bytes <= a.offset_bytes, (a, b)


@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_never_overlap_live_buffers_and_respect_the_bound(seed):
    buffers = _random_buffers(random.Random(seed), count=9, horizon=8)
    result = solve_layout(buffers, time_limit_seconds=5)
    _assert_no_live_overlap(result.buffers)
    assert result.arena_bytes >= result.lower_bound_bytes == lower_bound(buffers)
    assert result.arena_bytes <= result.greedy_arena_bytes


def test_mip_reaches_the_known_optimum_where_best_fit_does_not():
    """Best-fit (largest first) needs 12 units here; the optimum is 11, the lower bound (found by search)."""
    u = ALIGN_BYTES
    shape = [(1, 0, 3), (4, 0, 2), (3, 2, 3), (3, 2, 3), (4, 1, 3)]
    buffers = [Buffer(f"t{i}", -1, size * u, start, end) for i, (size, start, end) in enumerate(shape)]
    result = solve_layout(buffers, time_limit_seconds=5)
    _assert_no_live_overlap(result.buffers)
    assert result.greedy_arena_bytes == 12 * u
    assert result.arena_bytes == result.lower_bound_bytes == 11 * u
    assert result.solver in ("HiGHS", "CBC")


def _job(*overrides):
    return load_job_config(None, ["model.preset=llama-7b", "data.micro_batch_size=1", "cluster.num_workers=1",
                                  "optim.warmup_steps=2", *overrides])


def test_short_sequences_keep_everything_on_the_gpu():
    outcome = make_plan(_job("model.num_layers=4", "data.seq_len=8192"), load_profile("h100_sxm"))
    assert all(layer.keep_fraction == 1.0 for layer in outcome.plan.layers)
    assert outcome.plan.predicted["host_gib"] == 0


def test_long_sequences_move_activations_off_the_gpu_within_budget():
    outcome = make_plan(_job("model.num_layers=4", "data.seq_len=131072"), load_profile("h100_sxm"))
    predicted = outcome.plan.predicted
    assert any(layer.keep_fraction < 1 for layer in outcome.plan.layers)
    assert predicted["peak_gpu_gib"] <= predicted["gpu_budget_gib"] + 1e-3
    assert predicted["host_gib"] <= predicted["host_budget_gib"]


TIGHT = ("model.num_layers=4", "data.seq_len=131072")  # 7B shape, 1 x H100: exact fits at 0.55, not at 0.5


def test_approximate_techniques_only_when_allowed():
    """A job that fits only with approximate techniques is refused without plan.allow_approximate, and the refusal
    names that key; with it, the plan uses them."""
    h100 = load_profile("h100_sxm")
    with pytest.raises(PlanInfeasible, match="plan.allow_approximate=true"):
        make_plan(_job(*TIGHT, "plan.gpu_memory_fraction=0.5"), h100)
    allowed = make_plan(_job(*TIGHT, "plan.gpu_memory_fraction=0.5", "plan.allow_approximate=true"), h100)
    assert any(layer.swap_codec != "none" or layer.activation_compression != "none" for layer in allowed.plan.layers)


def test_compressed_layers_only_when_exact_techniques_do_not_fit_and_allowed(tmp_path):
    h100 = load_profile("h100_sxm")
    with pytest.raises(PlanInfeasible, match="does not fit"):
        make_plan(_job(*TIGHT, "plan.gpu_memory_fraction=0.5"), h100)
    outcome = make_plan(_job(*TIGHT, "plan.gpu_memory_fraction=0.5", "plan.allow_approximate=true"), h100)
    chosen = {layer.activation_compression for layer in outcome.plan.layers}
    assert chosen - {"none"} and all("linear_inputs=int8" in spec for spec in chosen - {"none"})
    assert outcome.plan.predicted["peak_gpu_gib"] <= outcome.plan.predicted["gpu_budget_gib"] + 1e-3
    summary = plan_summary(outcome.plan, tmp_path / "p.yaml", tmp_path / "p.png", 0.0)
    assert "linear_inputs=int8 silu=int8" in summary
    fits = make_plan(_job(*TIGHT, "plan.gpu_memory_fraction=0.55", "plan.allow_approximate=true"), h100)
    assert {(layer.activation_compression, layer.swap_codec) for layer in fits.plan.layers} == {
        ("none", "none")}  # it fits exactly: nothing approximate, even though allowed


def test_a_compression_section_is_planned_for_its_layers():
    job = _job(*TIGHT, "plan.gpu_memory_fraction=0.6", "compression.silu=int4", "compression.layers=[1,2]")
    outcome = make_plan(job, load_profile("h100_sxm"))
    specs = [layer.activation_compression for layer in outcome.plan.layers]
    assert specs[0] == specs[3] == "none" and specs[1] == specs[2] and "silu=int4" in specs[1]
    assert "silu=int4" in outcome.plan.inputs["compression"]  # another section needs another plan
    assert "compression" not in plan_inputs(_job(*TIGHT), load_profile("h100_sxm"), "bf16")


def test_the_trainer_installs_the_planned_compression(debug_model_config):
    from types import SimpleNamespace

    from orchestrator.memory import apply_plan
    from orchestrator.model import LlamaModel
    from planner.cost_model import PLANNER_COMPRESSION
    from spec.plan import LayerPlan, compression_spec

    model = LlamaModel(debug_model_config)
    plan = SimpleNamespace(layers=[LayerPlan(i, activation_compression=compression_spec(PLANNER_COMPRESSION)
                                             if i in (1, 3) else "none") for i in range(4)], runtime_arena={})
    job = load_job_config(None, [])
    assert apply_plan(model, plan, job.compression, job.token_elim, job.train).compressed_layers == [1, 3]
    assert [layer.mlp.saved_swiglu is not None for layer in model.layers] == [False, True, False, True]
    assert model.layers[1].attn.q_proj.saved_input is not None


def test_infeasible_job_says_why_and_what_fits():
    with pytest.raises(PlanInfeasible) as caught:
        make_plan(_job("data.seq_len=131072"), load_profile("h100_sxm"))
    message = str(caught.value)
    assert "does not fit on h100_sxm" in message and "it fits with" in message and "\n" not in message


def test_plan_file_round_trips_and_refuses_another_job(tmp_path):
    job = _job("model.num_layers=2", "data.seq_len=65536")
    profile = load_profile("h100_sxm")
    outcome = make_plan(job, profile)
    path = tmp_path / "p.yaml"
    save_plan(outcome.plan, path)
    assert load_plan(path) == outcome.plan
    check_plan_matches(outcome.plan, plan_inputs(job, profile, "bf16"), path)
    other = _job("model.num_layers=2", "data.seq_len=32768")
    with pytest.raises(PlanError, match="seq_len=65536"):
        check_plan_matches(outcome.plan, plan_inputs(other, profile, "bf16"), path)


def test_hand_edited_plan_is_refused(tmp_path):
    outcome = make_plan(_job("model.num_layers=2", "data.seq_len=8192"), load_profile("h100_sxm"))
    path = tmp_path / "p.yaml"
    save_plan(outcome.plan, path)
    path.write_text(path.read_text().replace("seq_len: 8192", "seq_len: 16384"))
    with pytest.raises(PlanError, match="inputs_hash"):
        load_plan(path)


@pytest.mark.parametrize("config", list_shipped_configs(), ids=lambda p: p.name)
def test_longtrain_plan_on_every_shipped_config_is_fast_and_tight(config, tmp_path, capsys):
    started = time.perf_counter()
    code = main(["plan", str(config), "--out", str(tmp_path / "plan.yaml"),
                 *(["--profile", "cpu"] if config.name == "default.yaml" else [])])
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert seconds < 10
    assert code == 0 and (tmp_path / "plan.png").is_file(), err  # every shipped config plans, within its budget
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.arena_bytes <= 1.05 * plan.lower_bound_bytes
    assert plan.predicted["peak_gpu_gib"] <= plan.predicted["gpu_budget_gib"]
    assert "MFU" in out and "note" not in out
    _no_two_live_entries_share_bytes(plan.layout, plan.arena_bytes)
    _no_two_live_entries_share_bytes(plan.layer_block_layout, plan.layer_block["arena_bytes"])
    if plan.runtime_arena:  # each kept share lives from its layer's forward to its backward: all at once at the head
        kept = [dict(b, start=0, end=1) for b in plan.runtime_arena["buffers"]]
        _no_two_live_entries_share_bytes(kept, plan.runtime_arena["arena_bytes"])


def _no_two_live_entries_share_bytes(entries, arena_bytes):
    """The plan file's own numbers, checked without the layout code: every entry inside the arena, and no two entries
    alive at the same time ([start, end) intervals) share a byte."""
    assert entries
    for i, a in enumerate(entries):
        assert 0 <= a["offset_bytes"] and a["offset_bytes"] + a["size_bytes"] <= arena_bytes, a
        for b in entries[i + 1:]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert (a["offset_bytes"] + a["size_bytes"] <= b["offset_bytes"]
                        or b["offset_bytes"] + b["size_bytes"] <= a["offset_bytes"]), (a, b)


def test_a_policy_that_lays_out_just_over_its_budget_is_solved_again_under_it():
    """MEMO's A800 job: the policy fills its 71.28 GiB budget and the laid-out plan came to 71.304 GiB (fraction
    rounding, alignment); the planner lowers the policy's budget by the excess instead of writing that plan."""
    job = load_job_config("configs/llama7b_1m_8xa800.yaml", [])
    predicted = make_plan(job, load_profile("a800")).plan.predicted
    assert predicted["gpu_budget_gib"] == 71.28 and predicted["peak_gpu_gib"] <= 71.28


def test_a_plan_whose_layout_stays_over_the_budget_is_refused_and_not_written(tmp_path, capsys):
    """A profile whose memory calibration adds 40 GiB to every plan (the policy's estimate leaves it out): the
    laid-out plan stays above the budget however the policy is tightened, and `longtrain plan` refuses it in one
    line with the change that fits, like any plan that does not fit."""
    import yaml

    from spec.hardware import PROFILES_DIR

    raw = yaml.safe_load((PROFILES_DIR / "h100_sxm.yaml").read_text())
    raw["calibration"] = {"peak_memory_offset_gib": 40.0, "source": "test: 40 GiB the policy does not see"}
    profile = tmp_path / "h100_offset.yaml"
    profile.write_text(yaml.safe_dump(raw))
    out = tmp_path / "plan.yaml"
    code = main(["plan", "configs/llama7b4l_128k_1xh100.yaml", "--profile", str(profile), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not fit on h100_sxm: the laid-out plan peaks at" in err and "GiB per GPU" in err
    assert "it fits with" in err or "the longest sequence that fits" in err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_cbc_is_used_without_highs_and_finds_the_same_optimum(monkeypatch):
    import planner.solver

    monkeypatch.setattr(planner.solver.pulp, "listSolvers", lambda onlyAvailable=True: ["PULP_CBC_CMD"])
    u = ALIGN_BYTES
    shape = [(1, 0, 3), (4, 0, 2), (3, 2, 3), (3, 2, 3), (4, 1, 3)]
    result = solve_layout([Buffer(f"t{i}", -1, s * u, a, b) for i, (s, a, b) in enumerate(shape)], 5)
    assert result.solver == "CBC" and result.arena_bytes == 11 * u


def test_a_keep_all_layer_block_holds_only_transients_and_its_backward_frees_the_kept_tensors_op_by_op():
    """A plain layer's forward activations are the kept ones (level 2, until its backward starts); its backward
    reads them in place and autograd frees each after its last use (the block's `@bwd` buffers)."""
    from planner.cost_model import CostModel
    from spec.hardware import load_profile
    from planner.schedule import keeps_everything, layer_block_buffers, step_buffers

    layer = CostModel(load_job_config(None, ["model.preset=llama-7b", "data.seq_len=32768"]),
                      load_profile("h100_sxm")).layer()
    full = {b.name: b for b in layer_block_buffers(layer)}
    plain = {b.name: b for b in layer_block_buffers(layer, plain=True)}
    assert "gate@bwd" in full and "gate" in full
    assert set(plain) == set(full) - {"attn_norm_out", "q", "k", "v", "attn_residual", "mlp_norm_out", "gate", "up",
                                      "silu_gate", "gated"}
    assert (plain["gated@bwd"].start, plain["gated@bwd"].end) == (8, 10)  # freed after the down projection's
    assert keeps_everything([LayerPlan(0), LayerPlan(1)])
    assert not keeps_everything([LayerPlan(0, offload_skeletal=True)])
    step = step_buffers([layer] * 2, [LayerPlan(0), LayerPlan(1)], 1, 0.0, [1.0, 1.0], head_reuses_block=True)
    first_backward = 3  # layer 1's: forwards at 0 and 1, the head at 2
    live = {(b.name, b.layer) for b in step if b.start <= first_backward < b.end}
    assert ("kept_token_wise", 0) in live and ("kept_token_wise", 1) not in live  # the block's @bwd holds layer 1's


@pytest.mark.parametrize("preset, precision, expanded", [("llama3-8b", "bf16", True), ("llama-7b", "bf16", False),
                                                         ("llama3-8b", "fp32", False)])
def test_the_attention_backward_holds_flash_attentions_per_query_head_dk_dv(preset, precision, expanded):
    """PyTorch's FlashAttention backward (`mha_bwd`) with fewer key/value heads than query heads writes dk and dv for
    every query head, then sums each group: two q-sized buffers beside dq's fp32 accumulator while the kernel runs
    (a lent H200's 256K plan of Llama-3-8B peaked 7.85 GiB above a model without them). Not with as many key/value
    heads as query heads (Llama-2), nor in an fp32 plan (no flash kernel)."""
    from planner.cost_model import CostModel
    from planner.schedule import layer_block_buffers

    layer = CostModel(load_job_config(None, [f"model.preset={preset}", "data.seq_len=32768"]), load_profile("h200"),
                      precision).layer()
    buffers = {b.name: b for b in layer_block_buffers(layer)}
    q = next(t.bytes_per_token for t in layer.tensors if t.name == "q") * layer.tokens
    if not expanded:
        assert "grad_kv_expanded" not in buffers
        return
    kv_expanded, accumulator = buffers["grad_kv_expanded"], buffers["grad_q_accum_fp32"]
    assert kv_expanded.size_bytes == 2 * q and (kv_expanded.start, kv_expanded.end) == (15, 16)
    assert (accumulator.start, accumulator.end) == (15, 16)  # both live while the kernel runs


def test_swap_hidden_fraction_is_a_parameter_of_the_plan_not_a_global():
    """`longtrain bench --swap-hidden` calibrates it: copies that hide nothing make swapping pointless."""
    import planner.policy

    job = load_job_config("configs/llama7b4l_128k_1xh100.yaml", ["plan.time_limit_seconds=1"])
    profile = load_profile("h100_sxm")
    default = make_plan(job, profile).plan.layers
    exposed = make_plan(job, profile, swap_hidden_fraction=0.0).plan.layers
    assert any(d.swap_fraction > 0.3 for d in default)
    assert all(d.swap_fraction == 0 for d in exposed)
    assert planner.policy.SWAP_HIDDEN_FRACTION == 0.9
