"""MEMO token-wise swap + recompute on CPU: exact gradients for any split, attention never recomputed, host
bytes as the planner predicts."""

import copy

import pytest
import torch

from spec.config import load_job_config
from orchestrator.memory import tokenwise
from orchestrator.memory.swap_stream import dense_flat
from orchestrator.model import LlamaModel
from spec.activations import layer_saved_tensors
from tests.conftest import layer_plans, loss_and_grads

SEQ_LEN, BATCH = 256, 2


def _model_and_batch(batch=BATCH):
    torch.manual_seed(0)
    job = load_job_config(None, [f"data.seq_len={SEQ_LEN}"])
    model = LlamaModel(job.model)
    tokens = torch.randint(0, 256, (batch, SEQ_LEN + 1))
    return job, model, tokens[:, :-1], tokens[:, 1:]


SPLITS = {  # per layer: keep, swap, recompute[, skeletal to host[, swap codec]]
    "swap all": [(0.0, 1.0, 0.0)] * 4,
    "swap half": [(0.5, 0.5, 0.0)] * 4,
    "recompute all": [(0.0, 0.0, 1.0)] * 4,
    "recompute half": [(0.5, 0.0, 0.5)] * 4,
    "three ways": [(0.25, 0.25, 0.5)] * 4,
    "skeletal to host": [(1.0, 0.0, 0.0, True)] * 4,
    "mixed per layer": [(1.0, 0.0, 0.0), (0.0, 0.5, 0.5, True), (0.0, 1.0, 0.0), (0.3, 0.0, 0.7)],
}


def _split(model, decisions, **config):
    return tokenwise.apply(model, tokenwise.Config(**config), layer_plans(decisions))


@pytest.mark.parametrize("name", SPLITS)
def test_gradients_equal_the_plain_run_bitwise(name):
    _, model, inputs, targets = _model_and_batch()
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    memo = copy.deepcopy(model)
    _split(memo, SPLITS[name])
    for _ in range(2):  # the second step reuses the host buffers
        loss, grads = loss_and_grads(memo, inputs, targets)
        assert torch.equal(loss, reference_loss)
        for key in reference:
            assert torch.equal(grads[key], reference[key]), key


def test_one_sequence_swaps_its_slices_as_flat_blocks_and_stays_exact():
    """Micro-batch 1 (the long-context case) copies each swapped slice as one dense block, head-major ones too."""
    _, model, inputs, targets = _model_and_batch(batch=1)
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    memo = copy.deepcopy(model)
    runtime = _split(memo, SPLITS["three ways"])
    for _ in range(2):
        loss, grads = loss_and_grads(memo, inputs, targets)
        assert torch.equal(loss, reference_loss)
        assert all(torch.equal(grads[key], reference[key]) for key in reference)
    assert all(buffer.dim() == 1 for buffer in runtime.pool.buffers.values())


@pytest.mark.parametrize("name", ["swap all", "skeletal to host", "swap half"])
def test_a_role_swapped_whole_is_read_where_its_bytes_were_fetched(name, monkeypatch):
    """Every token swapped as is: the restored tensor is the fetched block itself, not a copy of it in a new block
    of the same size (which at 256K made the caching allocator reserve a segment per MLP intermediate); a role
    with kept tokens is still assembled in a new tensor. Exact either way."""
    _, model, inputs, targets = _model_and_batch(batch=1)
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    memo = copy.deepcopy(model)
    _split(memo, SPLITS[name])
    fetched, restored, alive = set(), [], []  # alive: no other tensor may take a fetched block's address
    original_fetch, original_restore = tokenwise._fetch, tokenwise._restore

    def fetch(runtime, record, role, store):
        tensor = original_fetch(runtime, record, role, store).clone()  # on CPU: not the host buffer itself
        fetched.add(tensor.untyped_storage().data_ptr())
        alive.append(tensor)
        return tensor

    def restore(runtime, record, role):
        tensor = original_restore(runtime, record, role)
        if record.roles[role].host is not None:
            restored.append((role, tensor.untyped_storage().data_ptr() in fetched))
        return tensor

    monkeypatch.setattr(tokenwise, "_fetch", fetch)
    monkeypatch.setattr(tokenwise, "_restore", restore)
    loss, grads = loss_and_grads(memo, inputs, targets)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[key], reference[key]) for key in reference)
    in_place = [role for role, fetched_block in restored if fetched_block]
    assert restored and (len(in_place) == len(restored) if name != "swap half" else not in_place), in_place


def test_dense_flat_finds_one_block_or_none():
    head_major = torch.arange(8 * 3 * 4).view(1, 8, 3, 4).transpose(1, 2)  # [1, H=3, S=8, D=4] as [1, S, H, D]
    token_slice = head_major.narrow(2, 2, 5)
    flat = dense_flat(token_slice)
    assert torch.equal(flat, torch.arange(2 * 12, 7 * 12))
    assert dense_flat(torch.arange(48).view(2, 6, 4).narrow(1, 2, 3)) is None  # two sequences: two blocks


def test_attention_runs_once_per_layer_even_when_everything_is_recomputed(monkeypatch):
    _, model, inputs, targets = _model_and_batch()
    _split(model, SPLITS["recompute all"])
    calls = []
    for layer in model.layers:
        original = layer.attn.attend
        monkeypatch.setattr(layer.attn, "attend", lambda *a, _f=original: calls.append(1) or _f(*a))
    loss_and_grads(model, inputs, targets)
    assert len(calls) == len(model.layers)


def test_host_bytes_are_the_swapped_share_of_the_planned_inventory():
    job, model, inputs, targets = _model_and_batch()
    runtime = _split(model, SPLITS["swap half"])
    loss_and_grads(model, inputs, targets)
    token_wise = sum(t.bytes_per_token for t in layer_saved_tensors(job.model, 4) if not t.skeletal)
    expected = len(model.layers) * 0.5 * SEQ_LEN * BATCH * token_wise
    assert runtime.pool.bytes == pytest.approx(expected, rel=0.01)


def test_dropped_tokens_free_their_activations():
    """After forward, what the layers hold on the device is the kept share plus the skeletal tensors."""
    job, model, inputs, targets = _model_and_batch()
    runtime = _split(model, SPLITS["recompute all"])
    loss = model(inputs, targets=targets)
    held = 0
    for record in runtime.pending:
        for store in record.roles.values():
            for tensor in (store.kept, store.whole):
                held += tensor.numel() * tensor.element_size() if tensor is not None else 0
    skeletal = sum(t.bytes_per_token for t in layer_saved_tensors(job.model, 4) if t.skeletal and t.name != "attn_lse")
    assert held == pytest.approx(len(model.layers) * SEQ_LEN * BATCH * skeletal, rel=0.01)
    loss.backward()
    assert not runtime.pending


def test_recompute_in_chunks_is_still_exact():
    _, model, inputs, targets = _model_and_batch()
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    _split(model, SPLITS["three ways"], recompute_chunk_tokens=48)  # not a divisor of the 128 recomputed tokens
    loss, grads = loss_and_grads(model, inputs, targets)
    assert torch.equal(loss, reference_loss)
    assert all(torch.equal(grads[k], reference[k]) for k in reference)


def _live_activation_bytes(model):
    """Bytes of every live tensor storage that is not a parameter (what autograd keeps after a forward)."""
    import gc

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    for obj in gc.get_objects():
        if not _real_tensor(obj):
            continue
        if obj.untyped_storage().data_ptr() not in parameters:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def _real_tensor(obj) -> bool:
    """A tensor with memory of its own: not a dead weak proxy, a meta tensor or a fake one (a compiled or traced
    test that ran earlier in this process leaves those behind)."""
    try:
        return (isinstance(obj, torch.Tensor) and not obj.is_meta
                and type(obj).__name__ not in ("FakeTensor", "FunctionalTensor"))
    except ReferenceError:
        return False


def test_after_forward_only_the_skeletal_tensors_stay_alive():
    """Measured on the real objects: a leak (the hooks holding the full tensors until backward) fails this."""
    job, model, inputs, targets = _model_and_batch()
    before = _live_activation_bytes(model)
    plain_loss = model(inputs, targets=targets)
    plain_bytes = _live_activation_bytes(model) - before
    del plain_loss
    _split(model, SPLITS["recompute all"])
    before = _live_activation_bytes(model)
    loss = model(inputs, targets=targets)
    memo_bytes = _live_activation_bytes(model) - before
    per_token = {t.name: t.bytes_per_token for t in layer_saved_tensors(job.model, 4)}
    dropped = len(model.layers) * SEQ_LEN * BATCH * sum(b for n, b in per_token.items()
                                                        if n not in ("layer_input", "attn_out", "attn_lse"))
    assert plain_bytes - memo_bytes == pytest.approx(dropped, rel=0.05)
    loss.backward()


@pytest.mark.parametrize("name", ["three ways", "skeletal to host", "recompute half"])
def test_nothing_survives_a_step(name):
    """A reference cycle through autograd nodes (a stored tensor whose grad_fn leads back to the hooks) would
    keep every step's kept and restored tensors alive: Python's collector cannot see through C++ nodes."""
    import gc

    _, model, inputs, targets = _model_and_batch()
    runtime = _split(model, SPLITS[name])
    gc.collect()
    gc.disable()  # memory must be freed by reference counting, as soon as backward is done, not by a later sweep
    try:
        loss_and_grads(model, inputs, targets)
        settled = _live_activation_bytes(model)
        for _ in range(3):
            loss_and_grads(model, inputs, targets)
            assert _live_activation_bytes(model) == settled
    finally:
        gc.enable()
    assert not runtime.pending


def test_kept_slices_live_in_the_planned_arena_and_stay_exact():
    from orchestrator.memory import arena as memory_arena
    from spec.hardware import load_profile
    from planner.planning import make_plan

    job, model, inputs, targets = _model_and_batch()
    planned = load_job_config(None, [f"data.seq_len={SEQ_LEN}", f"data.micro_batch_size={BATCH}",
                                     "plan.gpu_memory_fraction=0.002"])
    plan = make_plan(planned, load_profile("cpu")).plan
    assert any(0 < layer.keep_fraction < 1 for layer in plan.layers), plan.layers
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    runtime = tokenwise.apply(model, tokenwise.Config(), plan.layers)
    arena = memory_arena.apply(model, memory_arena.Config(plan.runtime_arena, torch.device("cpu")),
                               [layer.layer for layer in plan.layers])
    model.zero_grad(set_to_none=True)
    loss = model(inputs, targets=targets)
    start, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.bytes
    kept = [s.kept for r in runtime.pending for s in r.roles.values() if s.kept is not None]
    outside = [tuple(t.shape) for t in kept if not start <= t.data_ptr() < end]
    assert kept and not outside and arena.fallbacks == 0, outside
    loss.backward()
    assert torch.equal(loss.detach(), reference_loss)
    assert all(torch.equal(p.grad, reference[n]) for n, p in model.named_parameters())


def test_a_slice_set_that_misses_its_region_is_counted_for_its_step_line():
    """A region too small for a layer's kept slices: no views (the caching allocator serves them), and the step's
    count and bytes say so once, then reset."""
    from orchestrator.memory.arena import KeptArena

    arena = KeptArena({"arena_bytes": 4096, "buffers": [{"layer": 0, "offset_bytes": 0, "size_bytes": 1024},
                                                         {"layer": 1, "offset_bytes": 1024, "size_bytes": 3072}]},
                      torch.device("cpu"))
    assert arena.views(1, [("a", (4, 64), torch.float32)]) is not None and arena.step_fallbacks() == (0, 0)
    assert arena.views(0, [("a", (2, 64), torch.float32), ("b", (8, 64), torch.bfloat16)]) is None
    assert arena.step_fallbacks() == (1, 512 + 1024) and arena.step_fallbacks() == (0, 0)


def test_unknown_technique_lists_the_valid_names():
    from spec.errors import ConfigError
    from orchestrator.memory import technique

    assert technique("swap").__name__.endswith("tokenwise")
    with pytest.raises(ConfigError, match="recompute, swap"):
        technique("offload_everything")


def test_int8_swap_restores_within_a_step_of_the_range_and_halves_host_bytes():
    """The plan's swap_codec int8: swapped slices cross as uint8 codes; the skeletal tensors stay exact."""
    from orchestrator.memory.quant_int8 import SwapCodes

    torch.manual_seed(0)
    values = torch.randn(64, 4, 32) * torch.linspace(0.1, 10, 32)  # channel groups with very different ranges
    values[3, 1, 7] = 80.0  # one outlier widens its group only
    flat = values.view(-1)
    codes = SwapCodes.encode(flat, 32, seed=0)
    assert codes.codes.dtype == torch.uint8 and codes.codes.numel() == flat.numel()
    restored = torch.empty_like(flat)
    codes.decode_into(restored, codes.codes)
    step = (codes.width / 255).repeat_interleave(32 // codes.low.numel())  # per channel
    assert ((restored.view(-1, 32) - flat.view(-1, 32)).abs() <= step + 1e-6).all()
    assert restored.max() == pytest.approx(80.0, abs=float(step.max()))  # clamped to, not wrapped past, the range
    draws = torch.stack([_decoded(SwapCodes.encode(flat, 32, seed)) for seed in range(1, 401)])
    bias = (draws.mean(0) - flat).abs().view(-1, 32) / step  # stochastic rounding: unbiased
    assert bias.mean() < 0.02


def test_int8_codes_clamp_at_both_ends_of_the_range_instead_of_wrapping():
    """floor((x - low) * 255 / width + u) reaches 256 at the top in fp32 (and below 0 for a value under a stale
    range); a uint8 cast would wrap those to 0 and 255, the far end of the range. Noise just under 1 (u = 0.9999)
    is the worst case for the top; every encoder rounds through `rounded_codes`."""
    from orchestrator.memory.quant_int8 import rounded_codes

    low, width = torch.tensor([-1.0]), torch.tensor([2.0])
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.0 + 2e-7, 1.5]).view(-1, 1, 1)
    codes = rounded_codes(x, 255.0 / width, low, torch.full(x.shape, 0.9999), 255)
    assert codes.view(-1).tolist() == [0, 0, 128, 255, 255, 255]


def _decoded(codes):
    out = torch.empty(codes.codes.shape, dtype=torch.float32)
    codes.decode_into(out, codes.codes)
    return out


def test_int8_swap_trains_close_to_exact_with_half_the_host_bytes():
    _, model, inputs, targets = _model_and_batch()
    reference_loss, reference = loss_and_grads(model, inputs, targets)
    exact, int8 = copy.deepcopy(model), copy.deepcopy(model)
    exact_runtime = _split(exact, [(0.25, 0.5, 0.25, True)] * 4)
    int8_runtime = _split(int8, [(0.25, 0.5, 0.25, True, "int8")] * 4)
    loss_and_grads(exact, inputs, targets)
    loss, grads = loss_and_grads(int8, inputs, targets)
    assert torch.equal(loss, reference_loss)  # the forward is exact: only what backward reads is quantised
    worst = max(((grads[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)
    assert 0 < worst < 0.05
    skeletal = 2 * SEQ_LEN * BATCH * 128 * 4 * 4  # layer input + attention output, fp32, 4 layers: exact
    assert int8_runtime.pool.bytes - skeletal == pytest.approx((exact_runtime.pool.bytes - skeletal) / 4, rel=0.01)


def test_int8_swapped_codes_leave_the_device_with_their_copy():
    """Between a layer's forward and its backward the device holds its kept slices and ranges, not the int8 codes
    of the swapped share (they were held to the end of the step: half the swapped bytes stayed on the device)."""
    _, model, inputs, targets = _model_and_batch()
    runtime = _split(model, [(0.25, 0.5, 0.25, True, "int8")] * 4)
    model(inputs, targets=targets)  # forward only: every layer awaits its backward
    stores = [store for record in runtime.pending for store in record.roles.values() if store.codes is not None]
    assert len(stores) > 0 and all(store.codes.codes is None for store in stores)
    assert all(store.host is not None and store.host.dtype == torch.uint8 for store in stores)
