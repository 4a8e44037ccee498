"""Mesa int8 and S2A int4: error bounds, clamping, running ranges, exact forward, and the bytes actually saved."""

import math

import pytest
import torch
import torch.nn.functional as F

from spec.config import CompressionConfig, ModelConfig
from orchestrator.memory import compact, compressed, quant_int4_deriv, quant_int8
from orchestrator.model import MLP, DecoderLayer, Linear, rope_tables


def _range(x: torch.Tensor, groups: int = 4, decay: float = 0.5) -> quant_int8.RunningRange:
    running = quant_int8.RunningRange(decay)
    running.update(quant_int8.grouped(x, groups))
    return running


def test_round_trip_error_below_one_step_inside_the_range():
    x = torch.randn(64, 32) * torch.linspace(0.1, 10, 32)
    running = _range(x)
    codes = quant_int8.quantize(x, running, 4, update=False, noise_seed=0)
    step = (running.alpha / 255).repeat_interleave(8)  # per channel: 4 groups of 8
    error = (codes.dequantize() - x).abs()
    print(f"int8 round trip: max error / step = {float((error / step).max()):.3f} (bound 1)")
    assert bool((error < step * (1 + 1e-5)).all())
    assert codes.codes.dtype == torch.uint8 and codes.codes.numel() == x.numel()


def test_values_outside_the_range_are_clamped_not_wrapped():
    running = _range(torch.tensor([[0.0, 1.0]]), groups=1)  # beta 0, alpha 1
    x = torch.tensor([[2.0, 3.0, -1.0, 0.5]])  # beta + 2 alpha, beta + 3 alpha, below
    restored = quant_int8.quantize(x, running, 1, update=False).dequantize()
    assert torch.allclose(restored[0, :3], torch.tensor([1.0, 1.0, 0.0]))  # a wrapped byte would give ~0 for 2.0
    assert abs(float(restored[0, 3]) - 0.5) <= 1 / 255


def test_stochastic_rounding_is_unbiased():
    x = torch.rand(1, 16)
    running = _range(torch.stack((torch.zeros(16), torch.ones(16))), groups=1)
    draws = x.expand(10_000, 16)
    restored = quant_int8.quantize(draws, running, 1, update=False, noise_seed=1)
    mean_error = (restored.dequantize().mean(0) - x[0]).abs()
    bound = 5 * (0.5 / 255) / math.sqrt(10_000)  # 5 standard errors of the worst case (fraction 1/2)
    print(f"int8 stochastic rounding: max |mean - x| = {float(mean_error.max()):.2e} (5 SE {bound:.2e}, "
          f"round-to-nearest would leave up to {0.5 / 255:.2e})")
    assert bool((mean_error < bound).all())


def test_running_range_first_sets_then_decays():
    running = quant_int8.RunningRange(0.9)
    first = torch.tensor([[[0.0, 2.0]]])
    running.update(first)
    assert float(running.alpha) == 2.0 and float(running.beta) == 0.0
    running.update(torch.tensor([[[-1.0, 5.0]]]))
    assert math.isclose(float(running.alpha), 0.9 * 2 + 0.1 * 6, rel_tol=1e-6)
    assert math.isclose(float(running.beta), 0.9 * 0 + 0.1 * -1, rel_tol=1e-6)


def test_head_major_tensors_get_one_range_per_head():
    x = torch.randn(2, 4, 16, 8)
    running = quant_int8.RunningRange(0.5)
    quant_int8.quantize(x, running, 4, update=True, head_major=True)
    before = running.alpha.clone()
    x2 = x.clone()
    x2[:, 1] *= 10
    running = quant_int8.RunningRange(0.5)
    quant_int8.quantize(x2, running, 4, update=True, head_major=True)
    changed = ~torch.isclose(running.alpha, before)
    assert changed.tolist() == [False, True, False, False]


def _int8_linear(decay: float = 0.5):
    torch.manual_seed(0)
    linear, reference = Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)
    reference.load_state_dict(linear.state_dict())
    linear.saved_input = compact.InputStore(3, quant_int8.Config(decay, num_groups=4))
    return linear, reference


def test_linear_forward_bitwise_input_gradient_exact_weight_gradient_within_bound():
    linear, reference = _int8_linear()
    x, g = torch.randn(4, 24, 32) * 3, torch.randn(4, 24, 16)
    outs, grads = [], []
    for module in (linear, reference):
        xx = x.clone().requires_grad_()
        out = module(xx)
        out.backward(g)
        outs.append(out)
        grads.append((xx.grad, module.weight.grad))
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    step = (linear.saved_input.running.alpha / 255).repeat_interleave(8)
    bound = g.reshape(-1, 16).abs().sum(0)[:, None] * step[None, :]  # |sum_i g_i (x_hat_i - x_i)|
    error = (grads[0][1] - grads[1][1]).abs()
    print(f"int8 linear dW: max error / bound = {float((error / bound).max()):.3f}")
    assert bool((error <= bound * (1 + 1e-4)).all()) and not torch.equal(grads[0][1], grads[1][1])


def test_ranges_move_only_in_training_forwards():
    linear, _ = _int8_linear(decay=0.5)
    x = torch.randn(2, 8, 32, requires_grad=True)
    linear(x)
    store = linear.saved_input
    alpha = store.running.alpha.clone()
    linear(x * 4)  # a new training batch: the range moves
    moved = store.running.alpha.clone()
    assert not torch.equal(moved, alpha)
    linear.eval()
    linear(x * 16)
    linear.train()
    with torch.no_grad():
        linear(x * 16)
    assert torch.equal(store.running.alpha, moved)


def _saved_bytes(run, params) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while `run` runs."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _layer(config: ModelConfig, **section):
    torch.manual_seed(1)
    layer = DecoderLayer(config).to(torch.bfloat16)
    model = torch.nn.Module()
    model.layers = [layer]
    if section:
        compressed.apply(model, compressed.Config(CompressionConfig(range_groups=8, **section)), [0])
    return layer


def test_saved_bytes_halve_with_int8_and_quarter_with_int4(debug_model_config: ModelConfig):
    """bf16 debug layer, 2 x 256 tokens: the compressed tensors' bytes, measured with saved-tensor hooks."""
    config, tokens = debug_model_config, 2 * 256
    hidden, inner = config.hidden_size, config.intermediate_size
    x = torch.randn(2, 256, hidden, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(256), config.head_dim, config.rope_theta, torch.bfloat16)

    def measure(**settings):
        layer = _layer(config, **settings)
        attn = _saved_bytes(lambda: layer.attn.project(layer.attn_norm(x), cos, sin), layer.parameters())
        mlp = _saved_bytes(lambda: layer.mlp(x), layer.parameters())
        return attn, mlp

    exact_attn, exact_mlp = measure()
    int8 = dict(linear_inputs="int8", norm_inputs="int8")
    int8_attn, int8_mlp = measure(silu="int8", **int8)
    _, int4_mlp = measure(silu="int4", **int8)
    scales = 2 * 8 * 4  # scale and offset, 8 groups, fp32, per compressed tensor
    # attention inputs: norm input x + rstd, then q/k/v's shared input (stored ONCE), RoPE's cos/sin tables
    rope = 2 * 256 * config.head_dim * 2
    assert exact_attn == tokens * (2 * hidden + 4 + 2 * hidden) + rope
    assert int8_attn == tokens * (hidden + 4 + hidden) + 2 * scales + rope
    # MLP: gate/up input, gate, silu(gate), up, gated in bf16 -> input, gate, up, gated as int8 (silu(gate) is
    # not kept: backward evaluates it) -> the gate as 4-bit codes
    assert exact_mlp == tokens * (2 * hidden + 4 * 2 * inner)
    assert int8_mlp == tokens * (hidden + 3 * inner) + 4 * scales
    assert int4_mlp == tokens * (hidden + inner // 2 + 2 * inner) + 4 * scales
    print(f"saved bytes, bf16 debug layer, {tokens} tokens: attention inputs {exact_attn} -> {int8_attn} (int8; "
          f"{rope} of them RoPE tables), MLP {exact_mlp} -> {int8_mlp} (int8) -> {int4_mlp} (int4 gate): "
          f"each int8 tensor 1/2 of bf16, the int4 gate 1/4")


def test_s2a_codes_pack_two_per_byte():
    codes = torch.randint(0, 16, (1001,), dtype=torch.uint8)
    packed = quant_int4_deriv.pack_nibbles(codes)
    assert packed.numel() == 501 and packed.dtype == torch.uint8
    assert torch.equal(quant_int4_deriv.unpack_nibbles(packed, 1001), codes)


def _silu_lipschitz_constants():
    """max |silu'| and max |silu''| on a dense grid, by autograd: anchors independent of the implementation's."""
    grid = torch.linspace(-20, 20, 400001, dtype=torch.float64, requires_grad=True)
    first, = torch.autograd.grad(F.silu(grid).sum(), grid, create_graph=True)
    second, = torch.autograd.grad(first.sum(), grid)
    return float(first.abs().max()), float(second.abs().max())


def test_s2a_value_and_derivative_error_bounds():
    """Gates spanning [-4, 3]: one range of width 7 in 15 steps; a stochastically rounded code is off by less than
    one step, so silu is off by at most max|silu'| x step and silu' by max|silu''| x step."""
    gate = torch.linspace(-4, 3, 7001).view(1, -1, 1).expand(1, -1, 8).reshape(-1, 8)
    store = compact.InputStore(0, quant_int4_deriv.Config(num_groups=1), bits=4)
    meta, tensors = store.pack(gate, training=True)
    value, slope = compressed.GateCodec(store).restore(meta, tensors, tuple(gate.shape))
    assert float(store.running.alpha) == pytest.approx(7.0)
    step = 7.0 / 15
    value_lipschitz, slope_lipschitz = _silu_lipschitz_constants()
    value_error = float((value - F.silu(gate)).abs().max())
    slope_error = float((slope - quant_int4_deriv.silu_derivative(gate)).abs().max())
    print(f"S2A int4 on a range of width 7: silu error {value_error:.3f} (bound {value_lipschitz * step:.3f}), "
          f"silu' error {slope_error:.3f} (bound {slope_lipschitz * step:.3f})")
    assert value_error <= value_lipschitz * step + 1e-6 and slope_error <= slope_lipschitz * step + 1e-6
    assert tensors[0].numel() == gate.numel() // 2


def test_s2a_mlp_forward_bitwise_and_gradients_within_the_bounds(debug_model_config: ModelConfig):
    torch.manual_seed(2)
    mlp, reference = MLP(debug_model_config), MLP(debug_model_config)
    reference.load_state_dict(mlp.state_dict())
    store = compact.InputStore(0, quant_int4_deriv.Config(num_groups=8), bits=4)
    mlp.saved_swiglu = compressed.CompactSwiGLU(compressed.GateCodec(store), compact.InputStore(1, None))
    x = torch.randn(2, 32, debug_model_config.hidden_size)
    gate = reference.gate_proj(x).detach().requires_grad_()
    up = reference.up_proj(x).detach().requires_grad_()
    exact = F.silu(gate) * up
    exact.backward(torch.ones_like(exact))
    gate2, up2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    meta, tensors = store.pack(gate2, training=True)
    up_meta = compact.Packed(16, False, tuple(up2.shape), up2.dtype)
    ours = compressed._CompactSwiGLU.apply(gate2, up2, mlp.saved_swiglu.gate_codec, meta, up_meta, 1, up2.detach(),
                                           *tensors)
    ours.backward(torch.ones_like(ours))
    assert torch.equal(ours, exact)
    value_lipschitz, slope_lipschitz = _silu_lipschitz_constants()
    step = store.running.alpha.repeat_interleave(44) / 15  # 8 groups of this layer's 352 gate channels
    value_bound, slope_bound = value_lipschitz * step, slope_lipschitz * step
    assert bool(((up2.grad - up.grad).abs() <= value_bound + 1e-6).all())
    assert bool(((gate2.grad - gate.grad).abs() <= up.abs() * slope_bound + 1e-6).all())
    with torch.no_grad():
        assert torch.equal(mlp(x), reference(x))
    assert torch.equal(mlp(x), reference(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_backward_in_row_chunks_equals_the_one_chunk_result(monkeypatch, bits):
    """The backward restores gate and up a chunk of rows at a time (bounded fp32 temporaries); the result must
    not depend on the chunking, including 4-bit rows of an odd width that straddle bytes."""
    torch.manual_seed(3)
    gate = torch.randn(9, 7, 11)  # 63 rows of 11 codes: odd width
    up = torch.randn(9, 7, 11)
    codec = compressed.GateCodec(compact.InputStore(
        0, quant_int4_deriv.Config(num_groups=1) if bits == 4 else quant_int8.Config(num_groups=1), bits=bits))
    up_store = compact.InputStore(1, quant_int8.Config(num_groups=1))
    grads = []
    for chunk in (10**9, 4 * 11):  # one chunk; 4 rows per chunk
        monkeypatch.setattr(compact, "BACKWARD_CHUNK_ELEMENTS", chunk)
        gate1, up1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
        meta, gate_tensors = codec.pack(gate1, training=False)
        up_meta, up_tensors = up_store.pack(up1, training=False)
        out = compressed._CompactSwiGLU.apply(gate1, up1, codec, meta, up_meta, len(up_tensors), *up_tensors,
                                              *gate_tensors)
        out.backward(torch.ones_like(out))
        grads.append((gate1.grad, up1.grad))
    # equal up to the last bit of fp32: vectorised sigmoid/silu kernels round a tensor's tail elements differently
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


def test_int8_linear_weight_gradient_in_row_chunks_equals_the_one_chunk_result(monkeypatch):
    """The weight gradient sums chunk products of restored rows (bounded fp32 temporaries): same result."""
    torch.manual_seed(4)
    x, g = torch.randn(3, 40, 32), torch.randn(3, 40, 16)
    grads = []
    for chunk in (10**9, 7 * 32):  # one chunk; 7 rows per chunk (not dividing the 120 rows)
        monkeypatch.setattr(compact, "BACKWARD_CHUNK_ELEMENTS", chunk)
        linear, _ = _int8_linear()  # a fresh store each time: the same first range and seed, so the same codes
        linear(x).backward(g)
        grads.append(linear.weight.grad.clone())
    # the same fp32 products summed in another order: a few ulps of the largest entry apart
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6 * float(grads[0].abs().max()))
