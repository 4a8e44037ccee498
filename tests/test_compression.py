"""The compression section: validation, installation on the model, exact forward, and loss curves on the corpus."""

from dataclasses import replace

import pytest
import torch

from spec.config import CompressionConfig, DataConfig, load_job_config
from orchestrator.data import build_windows
from spec.errors import ConfigError
from orchestrator.memory import apply_plan, compressed, technique
from orchestrator.model import LlamaModel

FULL = ["compression.linear_inputs=int8", "compression.norm_inputs=int8", "compression.silu=int4",
        "compression.wta_crs_keep_ratio=0.5"]


@pytest.mark.parametrize("override, fragment", [
    ("compression.silu=int2", "compression.silu ('int2') must be one of none, int8, int4"),
    ("compression.linear_inputs=fp8", "compression.linear_inputs ('fp8') must be one of none, int8"),
    ("compression.wta_crs_keep_ratio=0", "compression.wta_crs_keep_ratio (0.0) must be in (0, 1]"),
    ("compression.range_decay=1.0", "compression.range_decay (1.0) must be in [0, 1)"),
    ("compression.layers=[0,9]", "compression.layers ([0, 9]) must be all, none or a list of layer indices in 0..3"),
    ("compression.layers=some", "compression.layers ('some') must be all, none"),
])
def test_bad_values_fail_in_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        load_job_config(None, [override])
    assert fragment in str(error.value)


def test_the_approximate_techniques_are_applied_as_one_compression_section():
    """Mesa int8, S2A int4 and WTA-CRS are parts of one technique (`compression`), not entry points of their own:
    the codes and samplers cannot be applied past the section's checks."""
    assert technique("compression").__name__.endswith(".compressed")
    for name in ("quant_int8", "quant_int4_deriv", "wta_crs"):
        with pytest.raises(ConfigError, match="unknown"):
            technique(name)


def _compress(model, job, seed: int) -> list:
    """The job's compression section on its layers, as `apply_plan` applies it: the layers compressed."""
    return apply_plan(model, None, job.compression, job.token_elim, replace(job.train, seed=seed)).compressed_layers


def _pair(overrides, dtype=torch.float32):
    job = load_job_config(None, overrides)
    torch.manual_seed(0)
    model, reference = LlamaModel(job.model).to(dtype), LlamaModel(job.model).to(dtype)
    reference.load_state_dict(model.state_dict())
    return job, model, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_bitwise_exact_and_parameters_stay_the_same_objects(dtype):
    job, model, reference = _pair(FULL + ["compression.layers=[0,2]"], dtype)
    before = [(name, id(p)) for name, p in model.named_parameters()]
    assert _compress(model, job, seed=1)
    assert [(name, id(p)) for name, p in model.named_parameters()] == before
    assert model.layers[0].mlp.saved_swiglu is not None and model.layers[1].mlp.saved_swiglu is None
    tokens = torch.randint(0, 256, (2, 64))
    loss, exact = model(tokens, targets=tokens), reference(tokens, targets=tokens)
    assert torch.equal(loss, exact)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_nothing_installed_by_default():
    job, model, _ = _pair([])
    assert not _compress(model, job, seed=0)


LOSS_SEEDS = (0, 1, 2)
LOSS_BOUND = 0.02


def _loss_curve(overrides, seed: int, steps: int = 100) -> list:
    """Per-step training losses on the bundled corpus (debug model, 8 x 64 tokens a step) through the optimizer
    path `longtrain train` uses: the DeepSpeed engine built from the job's own DeepSpeed config (AdamW lr 3e-3,
    betas (0.9, 0.95), weight decay 0.1, WarmupCosineLR with 20 warm-up steps to 0.1 lr, gradient clip 1.0).
    `seed` sets the initial weights, the batches and the compression's draws; a technique and the exact run with
    the same seed see the same batches."""
    import deepspeed

    from orchestrator.ds_config import deepspeed_config

    job = load_job_config(None, overrides + ["data.seq_len=64", "data.micro_batch_size=8", "cluster.num_workers=1",
                                             f"train.max_steps={steps}"])
    torch.manual_seed(seed)
    model = LlamaModel(job.model)
    _compress(model, job, seed=seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(job, use_cuda=False))
    windows = build_windows(DataConfig(source="corpus", seq_len=64), 256, 0)
    batches = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, windows.num_train, (8,), generator=batches)
        batch = torch.stack([torch.from_numpy(windows.window(int(i))) for i in rows])
        loss = engine(batch[:, :-1], targets=batch[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def loss_gap(overrides, exact_curves: dict) -> tuple:
    """(mean over seeds of the relative gap of the last-50-step mean loss, per-seed gaps) against the exact runs."""
    gaps = []
    for seed, exact in exact_curves.items():
        ours = _loss_curve(overrides, seed)
        gaps.append((sum(ours[-50:]) - sum(exact[-50:])) / sum(exact[-50:]))
    return sum(gaps) / len(gaps), gaps


def _compressed_steps(checkpointing: str):
    """Two training steps of the debug model with every compression part on every layer and this
    train.activation_checkpointing: the last gradients, and each store's (step, running range)."""
    from tests.conftest import loss_and_grads

    job = load_job_config(None, FULL + [f"train.activation_checkpointing={checkpointing}"])
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    apply_plan(model, None, job.compression, job.token_elim, job.train)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        _, grads = loss_and_grads(model, tokens[:, :-1], tokens[:, 1:])
    stores = {}
    for name, module in model.named_modules():
        swiglu = getattr(module, "saved_swiglu", None)
        found = [getattr(module, "saved_input", None)] + ([swiglu.up_store, swiglu.gate_codec.store] if swiglu else [])
        for index, store in enumerate(s for s in found if s is not None and s.running is not None):
            stores.setdefault(id(store), (f"{name}[{index}]", store.step, store.running.alpha, store.running.beta))
    return grads, sorted(stores.values(), key=lambda entry: entry[0])


def test_activation_checkpointing_moves_the_ranges_once_a_step_and_keeps_the_gradients(one_rank_group, one_thread):
    """DeepSpeed's checkpointing recomputes each compressed layer in backward. Its first forward runs without
    autograd, so the stores pack (moving their running ranges and their step's seed) once a step, in the replay,
    from the same input: the ranges, steps and gradients equal the run without checkpointing, bit for bit. (A
    recomputation that packed as well as the forward would move each range twice a step.) About 3 s."""
    plain_grads, plain_stores = _compressed_steps("none")
    grads, stores = _compressed_steps("deepspeed")
    assert len(stores) == 4 * 7 and all(step == 2 for _, step, _, _ in stores)  # per layer: 3 linear inputs,
    # 2 norm inputs, the SwiGLU's up and gate
    for (name, step, alpha, beta), (_, plain_step, plain_alpha, plain_beta) in zip(stores, plain_stores):
        assert step == plain_step and torch.equal(alpha, plain_alpha) and torch.equal(beta, plain_beta), name
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)


@pytest.fixture(scope="module")
def exact_curves(one_rank_group):
    curves = {seed: _loss_curve([], seed) for seed in LOSS_SEEDS}
    assert all(sum(c[-50:]) / 50 < 0.5 * c[0] for c in curves.values())  # it learned: the gap means something
    return curves


@pytest.mark.slow  # 100 DeepSpeed steps a seed, three seeds a case: the longest tests of the suite
@pytest.mark.parametrize("overrides", [
    pytest.param(["compression.linear_inputs=int8"], id="mesa-int8"),
    pytest.param(["compression.silu=int4"], id="s2a-int4"),
    pytest.param(["compression.wta_crs_keep_ratio=0.7"], id="wta-crs-0.7", marks=pytest.mark.xfail(
        strict=True, reason="+4.50% (seeds +6.28/+5.33/+1.88%) through the trainer's optimizer path on 2026-12-01 "
                            "(-0.06% through the earlier hand-built AdamW); docs/log.md")),
])
def test_loss_curves_track_the_exact_run(exact_curves, overrides):
    """The technique's loss is within 2% of the exact run's: the mean of steps 51-100, as a relative gap averaged
    over seeds 0-2 (the same criterion for all three), through the optimizer path `longtrain train` uses.

    Why averaged over seeds: 512 tokens a step is a chaotic regime where a 1e-6 relative nudge of the initial
    weights alone moves one seed's last-50 mean by up to 1.5%, so one seed's gap is mostly noise; a biased or too
    noisy estimator shows as the same sign on every seed. Measured through the DeepSpeed engine (2026-12-01):
    Mesa int8 +1.49%, S2A int4 +1.30%, WTA-CRS@0.7 +4.50% (a known miss, marked: strict, so it fails the day it
    passes). Through the earlier hand-built AdamW + schedule (2026-11-26): -1.13%, -1.52%, -0.06%; there it failed
    the paper's i.i.d. WTA-CRS@0.7 (+2.34%), @0.3 (+2.71%) and @0.1 (+16.27%). It does NOT see mild biases
    (round-down S2A codes, WTA-CRS without importance weights): the estimator tests (test_quantization.py,
    test_wta_crs.py) catch those with z-tests over 10^4 draws."""
    gap, gaps = loss_gap(overrides, exact_curves)
    print(f"{overrides}: mean gap of steps 51-100 {gap:+.2%} (seeds {', '.join(f'{g:+.2%}' for g in gaps)})")
    assert abs(gap) < LOSS_BOUND, f"{gap:+.2%}"


@pytest.mark.parametrize("overrides", [FULL, ["compression.linear_inputs=int8"], ["compression.silu=int8"],
                                       ["compression.wta_crs_keep_ratio=0.25", "compression.norm_inputs=int8"]])
def test_planner_bytes_match_the_saved_tensor_hooks(overrides):
    """The planner's per-token bytes of a compressed layer, against what autograd holds (bf16, 512 tokens)."""
    from spec.activations import compressed_saved_tensors, layer_saved_tensors
    from orchestrator.model import rope_tables

    job, model, _ = _pair(overrides, torch.bfloat16)
    layer_exact = model.layers[0]
    x = torch.randn(2, 256, job.model.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(256), job.model.head_dim, job.model.rope_theta, torch.bfloat16)

    def saved_bytes(layer) -> int:
        skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in skip:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, cos, sin)
        return sum(seen.values())

    exact = saved_bytes(layer_exact)
    _compress(model, job, seed=0)
    ours = saved_bytes(model.layers[0])
    planned = [sum(t.bytes_per_token for t in tensors) * 512 for tensors in (
        layer_saved_tensors(job.model, 2), compressed_saved_tensors(job.model, 2, job.compression))]
    scales = 7 * 64  # at most 7 compressed tensors per layer, 64 B of fp32 scale and offset each
    print(f"{' '.join(overrides)}: saved {exact} -> {ours} B, planner delta {planned[0] - planned[1]:.0f} B")
    assert 0 <= (ours - exact) - (planned[1] - planned[0]) <= scales


def test_installing_nothing_restores_the_plain_modules():
    job, model, reference = _pair(FULL)
    _compress(model, job, seed=0)
    compressed.apply(model, compressed.Config(CompressionConfig()), range(len(model.layers)))  # nothing
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert not any(getattr(m, slot, None) is not None for m in model.modules()
                   for slot in ("saved_input", "saved_swiglu", "compression"))
