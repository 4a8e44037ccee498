"""WTA-CRS: unbiased (and the test can tell a biased variant), lower variance than CRS, exact where promised."""

import math

import pytest
import torch

from spec.config import CompressionConfig, ModelConfig
from orchestrator.memory import compact, compressed, wta_crs
from orchestrator.model import DecoderLayer, Linear, rope_tables

DRAWS = 20_000


def _problem(heavy: bool, seed: int = 0):
    """H [48, 6], G [48, 5]; heavy: log-normal row scales (a few rows dominate, winners exist); else input norms
    spread over [0.2, 2.2] and unit output gradients (no winner pays, plain CRS, but p is not uniform)."""
    gen = torch.Generator().manual_seed(seed)
    h, g = torch.randn(48, 6, generator=gen, dtype=torch.float64), torch.randn(48, 5, generator=gen,
                                                                               dtype=torch.float64)
    if heavy:
        h = h * torch.exp(1.5 * torch.randn(48, 1, generator=gen, dtype=torch.float64))
        g = g * torch.exp(1.0 * torch.randn(48, 1, generator=gen, dtype=torch.float64))
    else:
        h = h / h.norm(dim=1, keepdim=True) * (0.2 + 2 * torch.rand(48, 1, generator=gen, dtype=torch.float64))
        g = g / g.norm(dim=1, keepdim=True)
    return h, g


def _estimates(h, g, index, weight):
    return torch.einsum("dko,dki->doi", g[index] * weight.unsqueeze(-1).double(), h[index])


def _max_z(estimates, exact) -> float:
    """Largest |mean error| over entries in standard errors of the mean."""
    error = estimates.mean(0) - exact
    standard_error = estimates.std(0) / math.sqrt(estimates.shape[0])
    return float((error.abs() / standard_error.clamp_min(1e-12)).max())


@pytest.mark.parametrize("scheme", ["systematic", "wta_crs"])
@pytest.mark.parametrize("heavy, norms_only", [(True, False), (True, True), (False, False)])
def test_unbiased_and_dropping_the_importance_weight_is_caught(heavy, norms_only, scheme):
    h, g = _problem(heavy)
    p = wta_crs.row_norms(h) if norms_only else wta_crs.row_norms(h) * wta_crs.row_norms(g)
    k = wta_crs.budget(48, 0.25)
    if scheme == "wta_crs":
        num_c = wta_crs.num_winners(torch.sort(p, descending=True).values, k)
    else:
        num_c = int((wta_crs.inclusion_probabilities(p.double(), k) >= 1).sum())
    assert (num_c > 0) == heavy  # both branches of the estimator (kept-for-sure rows or none) are exercised
    index, weight = wta_crs.draw_rows(p, k, torch.Generator().manual_seed(1), DRAWS, scheme=scheme)
    if scheme == "systematic":
        assert all(len(set(row.tolist())) == k for row in index[:100])  # k distinct rows
    exact = g.t() @ h
    estimates = _estimates(h, g, index, weight)
    z = _max_z(estimates, exact)
    assert z < 5.0, f"max |z| {z:.2f}: biased"
    relative_error = float((estimates.mean(0) - exact).norm() / exact.norm())
    # The public code's slip: sampled rows weighted as if uniformly drawn (no 1/p_j); the same test must reject it.
    uniform = weight.clone()
    if scheme == "wta_crs":
        uniform[:, num_c:] = (48 - num_c) / (k - num_c)
    else:
        uniform[weight > 1] = (48 - num_c) / (k - num_c)
    biased_z = _max_z(_estimates(h, g, index, uniform), exact)
    print(f"{scheme} |C|={num_c} k={k} draws={DRAWS}: max|z|={z:.2f}, relative error of the mean "
          f"{relative_error:.4f}; without the importance weight max|z|={biased_z:.1f}")
    assert biased_z > 8.0, f"the test cannot see a dropped importance weight (max |z| {biased_z:.2f})"


def test_relative_error_of_the_mean_shrinks_like_one_over_sqrt_draws():
    h, g = _problem(heavy=True)
    exact = g.t() @ h
    estimates = wta_crs.estimate_weight_grad(h, g, 0.25, torch.Generator().manual_seed(2), num_draws=DRAWS)
    errors = [float((estimates[:n].mean(0) - exact).norm() / exact.norm()) for n in (DRAWS // 16, DRAWS)]
    single = float((estimates[0] - exact).norm() / exact.norm())
    assert errors[1] < errors[0] / 2 and errors[1] < single / 30


@pytest.mark.parametrize("heavy", [True, False])
def test_variance_systematic_below_wta_crs_below_crs(heavy):
    """WTA-CRS beats CRS when the winner condition holds; sampling without replacement beats both (no repeats)."""
    h, g = _problem(heavy)
    p = wta_crs.row_norms(h) * wta_crs.row_norms(g)
    k = wta_crs.budget(48, 0.25)
    sorted_p = torch.sort(p, descending=True).values
    num_c = wta_crs.num_winners(sorted_p, k)
    if heavy:
        assert float(sorted_p[:num_c].sum() / p.sum()) > num_c / k  # the winner condition P_C > |C| / k
    exact = g.t() @ h
    mse = {}
    for scheme in wta_crs.SCHEMES:
        index, weight = wta_crs.draw_rows(p, k, torch.Generator().manual_seed(3), DRAWS, scheme=scheme)
        mse[scheme] = float(((_estimates(h, g, index, weight) - exact) ** 2).sum((1, 2)).mean())
    print(f"E|G_hat - G|^2 ({'heavy' if heavy else 'flat'} norms): " + ", ".join(f"{s} {v:.3f}" for s, v in mse.items()))
    assert mse["systematic"] < mse["wta_crs"] <= mse["crs"]


def test_inclusion_probabilities_sum_to_the_budget_and_cap_at_one():
    gen = torch.Generator().manual_seed(8)
    for trial in range(30):
        p = torch.exp(2 * torch.randn(40, generator=gen, dtype=torch.float64))
        k = 5 + trial % 30
        pi = wta_crs.inclusion_probabilities(p, k)
        assert abs(float(pi.sum()) - k) < 1e-9 and float(pi.max()) <= 1.0
        free = pi < 1  # below the cap pi is proportional to p, and every capped row has the larger p
        assert torch.allclose(pi[free] / p[free], (pi[free] / p[free])[:1].expand(int(free.sum())))
        if not free.all():
            assert float(p[~free].min()) >= float(p[free].max())


def test_winner_count_is_the_argmin_rule():
    gen = torch.Generator().manual_seed(4)
    for trial in range(50):
        p = torch.exp(2 * torch.randn(40, generator=gen, dtype=torch.float64))
        p = torch.sort(p / p.sum(), descending=True).values
        k = 5 + trial % 20
        scores = [(1 - float(p[:c].sum())) / (k - c) for c in range(1, k)]
        best = min(range(len(scores)), key=scores.__getitem__)
        expected = best + 1 if scores[best] < 1 / k else 0
        assert wta_crs.num_winners(p, k) == expected
    assert wta_crs.num_winners(torch.full((40,), 1 / 40), 10) == 0  # flat p: plain CRS


def test_keep_ratio_one_is_exact():
    h, g = _problem(heavy=True)
    h, g = h.float(), g.float()
    assert torch.allclose(wta_crs.estimate_weight_grad(h, g, 1.0), g.t() @ h, rtol=1e-6, atol=1e-5)


def _sampled_linear(keep_ratio: float, bias: bool = True):
    torch.manual_seed(5)
    linear = Linear(16, 8, bias=bias)
    reference = torch.nn.Linear(16, 8, bias=bias)
    reference.load_state_dict(linear.state_dict())
    linear.saved_input = compact.InputStore(7, None, keep_ratio)
    return linear, reference


def _grads(module, x, g):
    x = x.clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out.backward(g)
    return out, x.grad, module.weight.grad, module.bias.grad


def test_input_and_bias_gradients_exact_and_weight_gradient_unbiased_in_the_layer():
    linear, reference = _sampled_linear(0.3)
    x, g = torch.randn(2, 32, 16), torch.randn(2, 32, 8)
    exact = _grads(reference, x, g)
    weight_grads = []
    for _ in range(500):  # each forward draws its own rows (the store's step moves on)
        out, dx, dw, db = _grads(linear, x, g)
        assert torch.equal(out, exact[0]) and torch.allclose(dx, exact[1], atol=1e-6) and torch.allclose(db, exact[3])
        weight_grads.append(dw.double())
    assert not torch.allclose(dw, exact[2], atol=1e-3)  # one estimate is noisy, their mean is right:
    assert _max_z(torch.stack(weight_grads), exact[2].double()) < 5.0


def test_keep_ratio_one_linear_matches_autograd():
    linear, reference = _sampled_linear(1.0)
    x, g = torch.randn(2, 32, 16), torch.randn(2, 32, 8)
    for ours, theirs in zip(_grads(linear, x, g), _grads(reference, x, g)):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_saved_bytes_are_the_kept_rows_plus_indices_and_each_step_draws_anew():
    linear, _ = _sampled_linear(0.25, bias=False)
    x = torch.randn(4, 64, 16, dtype=torch.bfloat16, requires_grad=True)
    linear = linear.to(torch.bfloat16)
    sizes = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != linear.weight.untyped_storage().data_ptr():
            sizes[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear(x)
    k = wta_crs.budget(256, 0.25)
    assert sorted(sizes.values(), key=str) == sorted([(torch.bfloat16, k * 16 * 2), (torch.int64, k * 8),
                                                       (torch.float32, k * 4)], key=str)
    print(f"WTA-CRS@0.25 saved {sum(s for _, s in sizes.values())} B vs {x.numel() * 2} B of bf16 input")
    store = linear.saved_input
    first = store.pack(x.detach().clone(), training=True)[1]
    later = store.pack(x.detach().clone(), training=True)[1]
    assert not torch.equal(first[1], later[1])  # each training step draws its own sample


def test_one_sample_per_shared_input_in_a_layer(debug_model_config: ModelConfig):
    torch.manual_seed(6)
    layer = DecoderLayer(debug_model_config)
    layer.activation_hooks = None
    model = torch.nn.Module()
    model.layers = [layer]
    compressed.apply(model, compressed.Config(CompressionConfig(wta_crs_keep_ratio=0.5)), [0])
    cos, sin = rope_tables(torch.arange(64), debug_model_config.head_dim, 10000.0, torch.float32)
    index_storages = set()

    def pack(t):
        if t.dtype == torch.int64 and t.dim() == 1:
            index_storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 64, debug_model_config.hidden_size, requires_grad=True), cos, sin)
    assert len(index_storages) == 3  # q/k/v share one sample, gate/up one, down one


def test_the_training_draw_reads_no_value_back_to_the_host(monkeypatch):
    """The systematic draw (what training uses) decides on the device: no tensor is turned into a Python number
    (on a GPU each such read waits for the device). Every read goes through these methods, so they raise here."""
    def refuse(*_):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    p = torch.rand(500, dtype=torch.float64) ** 4
    p[:50] = 0
    index, weight = wta_crs.draw_rows(p, 123, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert index.shape == weight.shape == (1, 123) and len(set(index[0].tolist())) == 123
