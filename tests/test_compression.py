"""The compression section: validation, installation on the model, exact forward, and loss curves on the corpus."""

import pytest
import torch

from orchestrator.config import DataConfig, load_job_config
from orchestrator.data import build_windows
from orchestrator.errors import ConfigError
from orchestrator.memory import compressed, technique
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


def test_registry_names():
    assert {technique(name).__name__.rsplit(".", 1)[1] for name in ("quant_int8", "quant_int4_deriv", "wta_crs")} == {
        "quant_int8", "quant_int4_deriv", "wta_crs"}


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
    assert compressed.apply_config(model, job.compression, seed=1)
    assert [(name, id(p)) for name, p in model.named_parameters()] == before
    assert type(model.layers[0].mlp).__name__ == "CompressedMLP" and type(model.layers[1].mlp).__name__ == "MLP"
    tokens = torch.randint(0, 256, (2, 64))
    loss, exact = model(tokens, targets=tokens), reference(tokens, targets=tokens)
    assert torch.equal(loss, exact)
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_nothing_installed_by_default():
    job, model, _ = _pair([])
    assert not compressed.apply_config(model, job.compression, seed=0)


def _loss_curve(overrides, steps: int = 100):
    """(mean loss of the last half, first loss) of plain AdamW on the bundled corpus (debug model, 8 x 64 tokens a
    step, the same batches for every run). The last half's mean, not the last steps': at lr 3e-3 from scratch a
    1e-6 relative nudge of the initial weights moves the last-10 mean by 3.3% and the last-50 mean by 1.3%."""
    job, model, _ = _pair(overrides + ["data.seq_len=64"])
    compressed.apply_config(model, job.compression, seed=0)
    windows = build_windows(DataConfig(source="corpus", seq_len=64), 256, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, windows.num_train, (8,), generator=batches)
        batch = torch.stack([torch.from_numpy(windows.window(int(i))) for i in rows])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[steps // 2:]) / (steps - steps // 2), losses[0]


def test_loss_curves_track_the_exact_run():
    """Mesa int8 stays within 2% (seeds 0-2 measured: -0.04%, -1.23%, -0.92%). S2A int4 and WTA-CRS@0.7 are
    noisier backwards and early training at this learning rate feels it: seeds 0-2 measured +0.29/+3.41/+4.27%
    and +0.21/+3.07/+1.80%, so they get 5%; their estimators are checked exactly in the other test files."""
    exact, first = _loss_curve([])
    assert exact < 0.8 * first  # it learned something, so the comparison means something
    for name, overrides, bound in (("Mesa int8 linear inputs", ["compression.linear_inputs=int8"], 0.02),
                                   ("S2A int4 silu", ["compression.silu=int4"], 0.05),
                                   ("WTA-CRS@0.7", ["compression.wta_crs_keep_ratio=0.7"], 0.05)):
        loss, _ = _loss_curve(overrides)
        gap = (loss - exact) / exact
        print(f"mean loss of steps 51-100: exact {exact:.4f}, {name} {loss:.4f} ({gap:+.2%}, bound {bound:.0%})")
        assert abs(gap) < bound, f"{name}: {gap:+.2%}"


@pytest.mark.parametrize("overrides", [FULL, ["compression.linear_inputs=int8"], ["compression.silu=int8"],
                                       ["compression.wta_crs_keep_ratio=0.25", "compression.norm_inputs=int8"]])
def test_planner_bytes_match_the_saved_tensor_hooks(overrides):
    """The planner's per-token bytes of a compressed layer, against what autograd holds (bf16, 512 tokens)."""
    from planner.cost_model import compressed_saved_tensors, layer_saved_tensors
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
    compressed.apply_config(model, job.compression, seed=0)
    ours = saved_bytes(model.layers[0])
    planned = [sum(t.bytes_per_token for t in tensors) * 512 for tensors in (
        layer_saved_tensors(job.model, 2), compressed_saved_tensors(job.model, 2, job.compression))]
    scales = 7 * 64  # at most 7 compressed tensors per layer, 64 B of fp32 scale and offset each
    print(f"{' '.join(overrides)}: saved {exact} -> {ours} B, planner delta {planned[0] - planned[1]:.0f} B")
    assert 0 <= (ours - exact) - (planned[1] - planned[0]) <= scales


def test_installing_nothing_restores_the_plain_modules():
    job, model, reference = _pair(FULL)
    compressed.apply_config(model, job.compression, seed=0)
    compressed.install(model, range(len(model.layers)), int8=None, silu_int4=None, keep_ratio=1.0)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert not any(hasattr(m, "store") or hasattr(m, "gate_codec") for m in model.modules())
