"""train.elementwise=compiled: the layer's RMSNorm, RoPE and SwiGLU through `orchestrator.elementwise`'s autograd
Functions. On CPU they run uncompiled (the compile itself is GPU-tested in tests/test_elementwise_gpu.py): the loss
is bitwise the eager model's and the gradients equal within fp32 rounding (SwiGLU's backward is written out); the
layer saves what it saves op by op less silu(gate), exactly as the planner's inventory says, also through the
token-wise runtime (swapped bytes) and with a swap / recompute plan."""

import copy

import pytest
import torch

from orchestrator import elementwise
from orchestrator.memory import tokenwise
from orchestrator.model import LlamaModel
from spec.activations import SILU_GATE, layer_saved_tensors
from spec.config import ModelConfig, load_job_config
from spec.errors import ConfigError
from tests.conftest import layer_plans, loss_and_grads

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def _pair(model_config=MODEL):
    torch.manual_seed(0)
    eager = LlamaModel(model_config)
    fused = copy.deepcopy(eager)
    assert elementwise.install(fused, "compiled", torch.device("cpu")).startswith("fused")
    return eager, fused


def _tokens(length, batch=2, vocab=MODEL.vocab_size):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(length))


def _assert_close(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    assert torch.equal(loss, want_loss)  # the forward is the same arithmetic
    for key, reference in want_grads.items():
        assert (grads[key] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item(), key


def test_the_fused_functions_give_the_eager_model():
    eager, fused = _pair()
    for length in (33, 20):  # any length (the compiled functions are dynamic)
        tokens = _tokens(length)
        _assert_close(loss_and_grads(fused, tokens[:, :-1], tokens[:, 1:]),
                      loss_and_grads(eager, tokens[:, :-1], tokens[:, 1:]))


@pytest.mark.parametrize("function", ["rope", "swiglu"])
def test_the_written_out_backwards_are_the_gradients(function):
    kernels = elementwise.FusedKernels(lambda fn: fn)
    torch.manual_seed(1)
    if function == "rope":
        angles = torch.randn(9, 4, dtype=torch.float64)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        inputs = (torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True),)
        assert torch.autograd.gradcheck(lambda x: kernels.rotate(x, cos, sin), inputs)
    else:
        inputs = tuple(torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(kernels.gated, inputs)


def _saved(model, tokens):
    found = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
        model(tokens)
    return found


def test_the_layer_saves_the_planned_inventory():
    """Op by op and fused, the layers save what `layer_saved_tensors` counts (the lse is the attention kernel's, the
    rest the roles): fused, one intermediate-wide tensor a layer less, silu(gate)."""
    eager, fused = _pair()
    tokens = _tokens(17)
    per_token = {False: layer_saved_tensors(MODEL, 4), True: layer_saved_tensors(MODEL, 4, fused_swiglu=True)}
    assert {t.name for t in per_token[False]} - {t.name for t in per_token[True]} == {SILU_GATE}
    eager_shapes = sorted(tuple(t.shape) for t in _saved(eager, tokens))
    fused_shapes = sorted(tuple(t.shape) for t in _saved(fused, tokens))
    silu_gate = (2, 17, MODEL.intermediate_size)
    for shape in fused_shapes:
        eager_shapes.remove(shape)  # fused saves nothing op by op does not
    assert eager_shapes == [silu_gate] * MODEL.num_layers


def test_the_token_wise_runtime_swaps_the_fused_inventory_and_stays_exact():
    """Every token swapped: the host holds exactly the fused inventory's token-wise bytes (no silu_gate), and a
    swap / recompute split gives the fused model's own gradients bit for bit."""
    job = load_job_config(None, ["data.seq_len=64", "train.elementwise=compiled"])
    eager, fused = _pair(job.model)
    tokens = _tokens(65, vocab=job.model.vocab_size)
    reference = loss_and_grads(fused, tokens[:, :-1], tokens[:, 1:])
    swapped = copy.deepcopy(fused)
    runtime = tokenwise.apply(swapped, tokenwise.Config(), layer_plans([(0.0, 1.0, 0.0)] * job.model.num_layers))
    got = loss_and_grads(swapped, tokens[:, :-1], tokens[:, 1:])
    token_wise = sum(t.bytes_per_token for t in layer_saved_tensors(job.model, 4, fused_swiglu=True)
                     if not t.skeletal)
    assert runtime.pool.bytes == pytest.approx(job.model.num_layers * 64 * 2 * token_wise, rel=0.01)
    split = copy.deepcopy(fused)
    tokenwise.apply(split, tokenwise.Config(), layer_plans([(0.25, 0.25, 0.5)] * job.model.num_layers))
    for run in (got, loss_and_grads(split, tokens[:, :-1], tokens[:, 1:])):
        assert torch.equal(run[0], reference[0])
        assert all(torch.equal(run[1][key], reference[1][key]) for key in reference[1])


def test_eager_keeps_the_layer_as_it_is_and_the_plan_knows_the_mode():
    from spec.hardware import load_profile
    from spec.plan import plan_inputs

    model = LlamaModel(MODEL)
    assert elementwise.install(model, "eager", torch.device("cuda")) == "eager"
    assert all(layer.attn.rope is elementwise.apply_rope and layer.mlp.fused_swiglu is None for layer in model.layers)
    profile = load_profile("h100_sxm")
    for mode, present in (("eager", False), ("compiled", True)):
        inputs = plan_inputs(load_job_config(None, [f"train.elementwise={mode}"]), profile, "bf16")
        assert ("elementwise" in inputs) == present


def test_an_unknown_mode_is_one_line():
    with pytest.raises(ConfigError, match=r"train.elementwise \('fused'\) must be one of eager, compiled"):
        load_job_config(None, ["train.elementwise=fused"])


def test_a_plan_for_the_fused_layer_has_no_silu_gate_buffers_and_a_lower_peak():
    """The layer block of train.elementwise=compiled: no silu(gate), no gradient of it (the fused backward makes d
    gate and d up in one pass); with every activation kept on the GPU the peak drops by at least the saved
    silu(gate)s (one intermediate-wide bf16 tensor per token per layer)."""
    from planner.planning import make_plan
    from spec.hardware import load_profile

    shape = ["model.preset=llama-7b", "model.num_layers=4", "data.seq_len=8192", "data.micro_batch_size=1",
             "cluster.num_workers=1"]
    outcomes = {mode: make_plan(load_job_config(None, [*shape, f"train.elementwise={mode}"]), load_profile("h200"))
                for mode in ("eager", "compiled")}
    names = {mode: {b.name for b in outcome.layer_block.buffers} for mode, outcome in outcomes.items()}
    assert "grad_silu_gate" in names["eager"]
    assert not {n for n in names["compiled"] if "silu_gate" in n}
    saved_silu = 4 * 8192 * 11008 * 2 / 2**30
    peaks = {mode: outcome.plan.predicted["peak_gpu_gib"] for mode, outcome in outcomes.items()}
    assert peaks["compiled"] <= peaks["eager"] - saved_silu
