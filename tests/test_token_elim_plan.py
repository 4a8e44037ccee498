"""Token elimination under a token-wise swap/recompute plan (CPU): the sparse layers give the gradients of the same
sparse model without the plan, their recomputation reuses the kept indices of the forward (never re-scores), and the
plan's shares apply to the kept rows of the attention half."""

import copy

import pytest
import torch

from spec.config import TokenElimConfig, load_job_config
from orchestrator.memory import token_elim, tokenwise
from orchestrator.model import LlamaModel
from tests.conftest import layer_plans, loss_and_grads

SEQ_LEN, BATCH, BLOCK = 256, 2, 64
RATIOS = {1: 0.5, 2: 0.5, 3: 0.25}
"""Layer 0 stays dense; 4 blocks of 64 tokens: 2, 2 and 1 kept."""


def _sparse_model_and_batch():
    torch.manual_seed(0)
    job = load_job_config(None, [f"data.seq_len={SEQ_LEN}"])
    model = LlamaModel(job.model)
    for name, param in model.named_parameters():  # larger weights: scores that differ between sequences and layers
        if "layers" in name and not name.endswith("norm.weight"):
            torch.nn.init.normal_(param, std=0.08)
    for ratio in sorted(set(RATIOS.values())):
        token_elim.apply(model, TokenElimConfig(keep_ratio=ratio, block_size=BLOCK),
                         [i for i, r in RATIOS.items() if r == ratio])
    tokens = torch.randint(0, 256, (BATCH, SEQ_LEN + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


SPLITS = {  # every layer: keep, swap, recompute[, skeletal to host]
    "swap all": (0.0, 1.0, 0.0),
    "recompute all": (0.0, 0.0, 1.0),
    "three ways": (0.25, 0.25, 0.5),
    "skeletal to host, rest recomputed": (0.3, 0.0, 0.7, True),
}


def _split(model, decision, **config):
    return tokenwise.apply(model, tokenwise.Config(**config), layer_plans([decision] * 4))


@pytest.mark.parametrize("name", SPLITS)
def test_sparse_layers_under_a_plan_give_the_gradients_of_the_sparse_model_without_it(name):
    model, inputs, targets = _sparse_model_and_batch()
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    kept_plain = [model.layers[i].token_elim.last_kept for i in RATIOS]
    assert not torch.equal(kept_plain[0][0], kept_plain[0][1])  # the two sequences keep different blocks
    planned = copy.deepcopy(model)
    _split(planned, SPLITS[name], recompute_chunk_tokens=48)  # chunks that cut the kept sequence and blocks anywhere
    for _ in range(2):  # the second step reuses the host buffers
        loss, grads = loss_and_grads(planned, inputs, targets)
        assert all(torch.equal(planned.layers[i].token_elim.last_kept, kept) for i, kept in zip(RATIOS, kept_plain))
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-7)
        for key in reference:  # not bitwise: under a plan the attention norm's backward sums over every row
            torch.testing.assert_close(grads[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)


def test_recomputation_reuses_the_kept_indices_and_never_rescores(monkeypatch):
    """After the forward the scorer is made to choose other blocks: gradients still equal the plain sparse run's
    (a recomputation that re-scored would recompute other rows), and it is not called during backward."""
    model, inputs, targets = _sparse_model_and_batch()
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    planned = copy.deepcopy(model)
    _split(planned, SPLITS["recompute all"])
    calls, original = [], token_elim.kept_token_indices

    def counting(layer, x, cos, sin):
        calls.append(torch.is_grad_enabled())
        kept = original(layer, x, cos, sin)
        return kept.flip(0) if perturbed else kept  # sequences swap their choices

    perturbed = False
    monkeypatch.setattr(token_elim, "kept_token_indices", counting)
    planned.zero_grad(set_to_none=True)
    loss = planned(inputs, targets=targets)
    assert len(calls) == len(RATIOS)
    perturbed = True
    loss.backward()
    assert len(calls) == len(RATIOS)
    torch.testing.assert_close(loss.detach(), reference_loss, rtol=1e-6, atol=1e-7)
    for name, param in planned.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
    perturbed_loss = planned(inputs, targets=targets).detach()  # the perturbation does change the function
    assert not torch.allclose(perturbed_loss, reference_loss, rtol=1e-4)


def test_the_plan_splits_the_kept_rows_of_the_attention_half():
    """Swapping everything: a sparse layer's attention tensors on the host have the kept tokens only, its MLP
    tensors every token."""
    model, inputs, targets = _sparse_model_and_batch()
    runtime = _split(model, SPLITS["swap all"])
    model(inputs, targets=targets).backward()
    tokens = {(key[0], key[1]): buffer.numel() for key, buffer in runtime.pool.buffers.items()}
    for layer, ratio in {0: 1.0, **RATIOS}.items():
        for role in ("attn_norm_out", "q", "k", "v"):
            assert tokens[layer, role] == ratio * tokens[0, role]
        for role in ("attn_residual", "gate", "gated"):
            assert tokens[layer, role] == tokens[0, role]


# --- the planner counts the memory a sparse layer saves ---

def _llama_job(*overrides):
    return load_job_config(None, ["model.preset=llama-7b", "model.num_layers=4", "data.micro_batch_size=1",
                                  "cluster.num_workers=1", "optim.warmup_steps=2", *overrides])


ELIM = ["token_elim.enabled=true", "token_elim.keep_ratio=0.4", "token_elim.dense_first_layers=1",
        "token_elim.dense_last_layers=1"]


def test_predicted_peak_is_lower_by_the_attention_block_of_the_kept_share():
    """Layers 1 and 2 keep 51 of 128 blocks at 8K tokens; both plans keep everything. Per token a sparse layer saves
    (1 - share) x its attention block (attention output and log-sum-exp, normed rows, q, k, v) and x its input (it
    keeps the gathered input rows: `planner.schedule.plain_sparse_skeletal_bytes`) and adds the kept rows' index and
    cos/sin rows."""
    from spec.hardware import load_profile
    from planner.planning import make_plan

    profile = load_profile("h100_sxm")
    dense = make_plan(_llama_job("data.seq_len=8192"), profile).plan
    sparse = make_plan(_llama_job("data.seq_len=8192", *ELIM), profile).plan
    assert all(layer.keep_fraction == 1 for layer in dense.layers + sparse.layers)
    model, e, share, tokens = dense_model(), 2, 51 / 128, 8192
    kv = model.num_kv_heads * model.head_dim
    block = e * (3 * model.hidden_size + 2 * kv) + 4 * model.num_heads
    saved = 2 * tokens * ((1 - share) * (block + e * model.hidden_size) - share * (8 + 2 * model.head_dim * e))
    expected_gib = profile.calibration.peak_memory_factor * saved / 2**30
    difference = dense.predicted["peak_gpu_gib"] - sparse.predicted["peak_gpu_gib"]
    print(f"\npredicted peak at 8K: dense {dense.predicted['peak_gpu_gib']} GiB, token_elim "
          f"{sparse.predicted['peak_gpu_gib']} GiB (expected difference {expected_gib:.3f})")
    assert difference == pytest.approx(expected_gib, abs=0.003)
    assert sparse.predicted["step_seconds"] < dense.predicted["step_seconds"]
    assert sparse.inputs["token_elim"]["keep_ratios"] == {1: 0.4, 2: 0.4} and "token_elim" not in dense.inputs


def dense_model():
    return _llama_job().model


def _floor_gib(job, profile):
    """The smallest GPU budget a plan fits (bisected to 1/256 of the GPU; the refusal's 'needs at least' is a
    lower bound only, now that a layer may also be replayed whole)."""
    from planner.planning import PlanInfeasible, make_plan

    low, high = 96, 112  # both jobs fit at 0.4375 of an H100 and not at 0.375
    while high - low > 1:
        middle = (low + high) // 2
        job.plan.gpu_memory_fraction = middle / 256
        try:
            make_plan(job, profile)
            high = middle
        except PlanInfeasible:
            low = middle
    return high / 256 * profile.device_memory_gib


def test_a_job_that_does_not_fit_dense_fits_with_token_elimination_and_the_mip_uses_the_freed_memory():
    """With almost no host memory (a dense layer replayed whole keeps its input, a sparse one its kept rows'
    attention output too, but its working set is smaller)."""
    from spec.hardware import load_profile
    from planner.planning import PlanInfeasible, make_plan

    profile = load_profile("h100_sxm")
    common = ["data.seq_len=65536", "plan.host_memory_fraction=0.001", "plan.time_limit_seconds=1"]
    floors = [_floor_gib(_llama_job(*common, *extra), profile) for extra in ([], ELIM)]
    assert floors[1] < floors[0]
    between = f"plan.gpu_memory_fraction={(floors[0] + floors[1]) / 2 / profile.device_memory_gib:.4f}"
    with pytest.raises(PlanInfeasible):
        make_plan(_llama_job(*common, between), profile)
    assert make_plan(_llama_job(*common, *ELIM, between), profile).plan.predicted["peak_gpu_gib"] < floors[0]
    # with room for some activations, the dense layers of the sparse job keep more than the dense job's layers
    tight = [make_plan(_llama_job(*common, *extra, "plan.gpu_memory_fraction=0.6"), profile).plan
             for extra in ([], ELIM)]
    kept = [[tight[j].layers[i].keep_fraction for i in (0, 3)] for j in (0, 1)]
    print(f"\nfloors {floors} GiB; keep fractions of layers 0 and 3 at 60%: dense {kept[0]}, token_elim {kept[1]}; "
          f"step {tight[0].predicted['step_seconds']} vs {tight[1].predicted['step_seconds']} s")
    assert sum(kept[1]) > sum(kept[0]) and max(kept[0]) < 1
    assert tight[1].predicted["step_seconds"] < tight[0].predicted["step_seconds"]


def test_a_sparse_plan_places_the_kept_rows_in_their_planned_arena_regions():
    """The plan sizes each sparse layer's arena region for its kept rows (attention roles split over the kept
    sequence): the runtime's slices land in it with no fallback, and gradients stay those of the unplanned run."""
    from orchestrator.memory import arena as memory_arena
    from spec.hardware import load_profile
    from spec.plan import align
    from planner.planning import make_plan

    job = load_job_config(None, [f"data.seq_len={SEQ_LEN}", f"data.micro_batch_size={BATCH}",
                                 "plan.gpu_memory_fraction=0.002", "token_elim.enabled=true",
                                 "token_elim.keep_ratio=0.5", "token_elim.dense_first_layers=1",
                                 "token_elim.dense_last_layers=0"])
    plan = make_plan(job, load_profile("cpu")).plan
    partly = [layer.layer for layer in plan.layers if 0 < layer.keep_fraction < 1]
    assert set(partly) & {1, 2, 3}, plan.layers
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    tokens = torch.randint(0, 256, (BATCH, SEQ_LEN + 1))
    reference = copy.deepcopy(model)
    sparse = sorted(job.token_elim.keep_ratios(job.model.num_layers))
    token_elim.apply(reference, job.token_elim, sparse)
    reference_loss, reference_grads = loss_and_grads(reference, tokens[:, :-1], tokens[:, 1:])
    runtime = tokenwise.apply(model, tokenwise.Config(), plan.layers)
    arena = memory_arena.apply(model, memory_arena.Config(plan.runtime_arena, torch.device("cpu")),
                               [layer.layer for layer in plan.layers])
    token_elim.apply(model, job.token_elim, sparse)
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    start, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.bytes
    kept = {r.layer_index: [s.kept for s in r.roles.values() if s.kept is not None] for r in runtime.pending}
    assert all(start <= t.data_ptr() < end for i in partly for t in kept[i]) and arena.fallbacks == 0
    regions = {b["layer"]: b["size_bytes"] for b in plan.runtime_arena["buffers"]}
    for i in partly:  # exactly the planned bytes, not just within them
        assert regions[i] == sum(align(t.numel() * t.element_size()) for t in kept[i]), i
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference_loss, rtol=1e-6, atol=1e-7)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)


# --- with compression (issue 7): per-layer compact bytes, and no plan that splits a sparse compressed layer ---

def test_a_compressed_sparse_layer_stores_the_compact_forms_of_its_kept_rows():
    from planner.cost_model import PLANNER_COMPRESSION, CostModel
    from spec.hardware import load_profile

    cost = CostModel(_llama_job("data.seq_len=8192", *ELIM), load_profile("h100_sxm"))
    share = cost.keep_shares()[1]
    dense, sparse = cost.compressed_layers(PLANNER_COMPRESSION)[0:2]
    compact = {t.name: t.bytes_per_token for t in dense.tensors}
    kept = {t.name: t.bytes_per_token for t in sparse.tensors}
    for name in ("attn_norm_out", "q", "k", "v"):  # the attention block's compact forms, of the kept rows only
        assert kept[name] == pytest.approx(share * compact[name])
    for name in ("mlp_norm_out", "gate", "up", "gated"):
        assert kept[name] == compact[name]
    assert sparse.skeletal_bytes == cost.layers()[1].skeletal_bytes  # skeletal tensors stay exact
    assert sparse.token_wise_bytes < dense.token_wise_bytes < cost.layers()[0].token_wise_bytes


def test_the_plan_keeps_a_compressed_sparse_layer_whole_as_the_runtime_requires():
    """Token elimination on a layer that is compressed and split is refused (`spec.plan.check_plan_composes`); the
    MIP keeps such layers whole with their skeletal tensors on the GPU (without that constraint it offloads them
    here)."""
    from dataclasses import replace

    from spec.hardware import load_profile
    from planner.planning import _solve, make_plan
    from planner.policy import solve_policy

    job = _llama_job("data.seq_len=32768", "plan.gpu_memory_fraction=0.42", "compression.linear_inputs=int8",
                     "compression.layers=[1,2]", *ELIM)
    plan = make_plan(job, load_profile("h100_sxm")).plan
    print("\n" + "\n".join(f"layer {d.layer}: keep {d.keep_fraction} offload {d.offload_skeletal} "
                           f"{d.activation_compression}" for d in plan.layers))
    assert [d.activation_compression != "none" for d in plan.layers] == [False, True, True, False]
    assert all(d.keep_fraction == 1 and not d.offload_skeletal for d in plan.layers[1:3])
    assert plan.layers[0].keep_fraction < 1  # the dense layers still get split
    _, _, inputs, _ = _solve(job, load_profile("h100_sxm"))
    free = solve_policy(replace(inputs, sparse=()), job.plan.time_limit_seconds)
    assert any(d.keep_fraction < 1 or d.offload_skeletal for d in free.decisions[1:3])


def test_a_sparse_layers_block_scoring_is_priced_at_the_profiles_measured_scoring_rate():
    """The scoring kernel's q.k FLOPs at its own measured rate (`profile hardware`'s token_scoring row); a profile
    without the row prices it at SCORING_TO_ATTENTION_RATE x SDPA's rate, whatever attention kernel the job runs."""
    import copy as copy_module

    from spec.flops import block_scoring_flops_per_token
    from spec.hardware import load_profile
    from planner.cost_model import SCORING_TO_ATTENTION_RATE, CostModel

    job = _llama_job("data.seq_len=65536", *ELIM)
    measured = load_profile("h100_sxm")
    assert measured.measured.token_scoring_tflops_by_seq_len[65536] == 202.2
    faster = copy_module.deepcopy(measured)
    faster.measured.token_scoring_tflops_by_seq_len = {
        seq: 2 * rate for seq, rate in measured.measured.token_scoring_tflops_by_seq_len.items()}
    scoring_seconds = block_scoring_flops_per_token(job.model, 65536) * 65536 / (202.2e12)
    saved = CostModel(job, measured).layer(0.4).forward_seconds - CostModel(job, faster).layer(0.4).forward_seconds
    assert saved == pytest.approx(scoring_seconds / 2, rel=1e-9)
    assert CostModel(job, measured).layer().forward_seconds == CostModel(job, faster).layer().forward_seconds

    unmeasured = copy_module.deepcopy(measured)
    unmeasured.measured.token_scoring_tflops_by_seq_len = {}
    for kernel in ("sdpa", "fa4"):
        cost = CostModel(_llama_job("data.seq_len=65536", f"train.attention_kernel={kernel}", *ELIM), unmeasured)
        assert cost.scoring_tflops(65536) == pytest.approx(
            SCORING_TO_ATTENTION_RATE * cost.attention_tflops(65536, "sdpa"))


def test_a_sparse_layers_extras_run_over_every_token():
    """Token elimination shortens the attention block (its projections, its attention), not the layer's extras (the
    overhead factor's share, norms, SwiGLU): dense minus sparse per-token time is the eliminated projections' FLOPs
    at the bare matmul rate (the 64K trace: extras 18 ms a sparse layer, 16 ms a dense one)."""
    from spec.flops import attention_projection_params
    from spec.hardware import load_profile
    from planner.cost_model import CostModel

    profile = load_profile("h200")
    cost = CostModel(_llama_job("data.seq_len=65536", *ELIM), profile)
    assert cost.overhead.matmul_factor > 1  # otherwise the extras would be nothing to keep
    saved = cost.layer().recompute_seconds - cost.layer(0.4).recompute_seconds
    eliminated = 2.0 * 0.6 * attention_projection_params(cost.model) * cost.tokens_per_gpu
    assert saved == pytest.approx(eliminated / (cost.matmul_tflops() * 1e12) * profile.calibration.matmul_time_factor)


def test_a_plain_sparse_layer_saves_its_kept_input_rows_as_the_planner_counts():
    """A token-eliminated layer with no split saves its gathered input rows, not the whole input (the gather keeps
    its indices only): what autograd holds after its forward (each storage once) is the planner's count for it."""
    from launch.measure.hardware import saved_bytes_per_token
    from planner.cost_model import CostModel
    from orchestrator.model import rope_tables
    from planner.schedule import plain_sparse_skeletal_bytes
    from spec.hardware import load_profile

    job = load_job_config(None, ["data.seq_len=512", "train.elementwise=eager"])
    torch.manual_seed(0)
    model = LlamaModel(job.model).to(torch.bfloat16)
    token_elim.apply(model, TokenElimConfig(keep_ratio=0.4, block_size=BLOCK), [0])
    layer = model.layers[0]
    x = torch.randn(1, 512, job.model.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(512), job.model.head_dim, job.model.rope_theta, torch.bfloat16)
    measured = saved_bytes_per_token(layer, x, cos, sin)
    share = layer.token_elim.last_kept.shape[1] / 512
    assert share < 1
    cost = CostModel(job, load_profile("h100_sxm")).layer(share)
    predicted = (plain_sparse_skeletal_bytes(cost) + cost.token_wise_bytes) / cost.tokens
    assert measured == pytest.approx(predicted, rel=0.002)
