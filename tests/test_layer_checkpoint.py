"""A plan's whole-layer checkpoint (`LayerPlan.checkpoint_layer`, run by the token-wise runtime through
`orchestrator.memory.layer_replay`): gradients equal plain PyTorch's bit for bit, the layer keeps only its input
(on the GPU or in host memory), its forward runs once more in backward, and the plan file records the choice."""

import copy
import gc

import pytest
import torch

from orchestrator.lora import apply_lora
from orchestrator.memory import apply_plan, tiled_mlp, tokenwise
from orchestrator.model import MLP, Attention, LlamaModel
from spec.config import load_job_config
from spec.plan import LayerPlan, Plan, PlanError, check_plan_composes
from tests.conftest import StorageTracker, loss_and_grads

SHAPE = ["model.num_layers=3", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=160", "model.vocab_size=256", "data.seq_len=128"]
SEQ_LEN, BATCH = 128, 2


def checkpointed(layer: int, input_on_host: bool) -> LayerPlan:
    return LayerPlan(layer, keep_fraction=0.0, recompute_fraction=1.0, offload_skeletal=input_on_host,
                     checkpoint_layer=True)


PLANS = {  # per layer: a LayerPlan, or None for a plain layer
    "every layer, inputs on the gpu": [checkpointed(i, False) for i in range(3)],
    "every layer, inputs on the host": [checkpointed(i, True) for i in range(3)],
    "mixed with token-wise splits": [checkpointed(0, True), LayerPlan(1, 0.25, 0.25, 0.5, True),
                                     checkpointed(2, False)],
    "one layer between plain ones": [None, checkpointed(1, True), None],
}


def _job(*overrides):
    return load_job_config(None, [*SHAPE, *overrides])


def _model(job, lora=False):
    torch.manual_seed(0)
    model = LlamaModel(job.model)
    if lora:
        model = apply_lora(model, job.model.lora)
        with torch.no_grad():  # peft starts B at zero, which would zero A's gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.05)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (BATCH, SEQ_LEN + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def plan_with_layers(layers) -> Plan:
    """A plan with these layer decisions and nothing else (what `apply_plan` and the composition check read)."""
    return Plan(inputs={}, inputs_hash="", layers=layers, layout=[], layer_block_layout=[], arena_bytes=0,
                lower_bound_bytes=0, layer_block={}, predicted={}, solver={})


def _apply(model, plans):
    return tokenwise.apply(model, tokenwise.Config(), [p for p in plans if p is not None])


def _assert_bitwise(reference, other):
    assert torch.equal(reference[0], other[0])
    assert reference[1].keys() == other[1].keys()
    for key in reference[1]:
        assert torch.equal(reference[1][key], other[1][key]), key


@pytest.mark.parametrize("name", PLANS)
def test_gradients_equal_plain_pytorch_bitwise(name):
    job = _job()
    model = _model(job)
    inputs, targets = _batch()
    reference = loss_and_grads(model, inputs, targets)
    planned = copy.deepcopy(model)
    runtime = _apply(planned, PLANS[name])
    for _ in range(2):  # the second step reuses the host buffers
        _assert_bitwise(reference, loss_and_grads(planned, inputs, targets))
    assert not runtime.pending


@pytest.mark.parametrize("input_on_host", [False, True])
def test_lora_and_the_tiled_mlp_stay_bitwise(input_on_host, monkeypatch):
    """LoRA's frozen embedding gives layer 0 an input without a gradient (the replay must not add one, or autograd
    would save other tensors); the tiled MLP (DeepSpeed's TiledMLP) saves its input through the same hooks, and the
    replay skips its work: the MLP runs as often as in the plain tiled run (each tile's forward, then again in
    TiledMLP's backward)."""
    job = _job("model.lora.rank=4", "model.lora.alpha=8", "model.tie_embeddings=false")
    inputs, targets = _batch()
    calls = []
    untiled = MLP.untiled
    monkeypatch.setattr(MLP, "untiled", lambda self, x: calls.append(1) or untiled(self, x))
    plain = _model(job, lora=True)
    tiled_mlp.apply(plain, tiled_mlp.Config(tile_tokens=40), range(3))
    reference = loss_and_grads(plain, inputs, targets)
    plain_calls, calls[:] = len(calls), []
    planned = _model(job, lora=True)
    tiled_mlp.apply(planned, tiled_mlp.Config(tile_tokens=40), range(3))
    _apply(planned, [checkpointed(i, input_on_host) for i in range(3)])
    _assert_bitwise(reference, loss_and_grads(planned, inputs, targets))
    assert len(calls) == plain_calls == 3 * 2 * 7  # 3 layers, forward and backward, 7 tiles of 2 x 128 tokens
    assert planned.layers[0].mlp.tiling is not tiled_mlp.replay_runner


def test_a_checkpointed_layer_keeps_only_its_input_and_attends_twice(monkeypatch):
    """After the forward each layer's record holds its input (in the host pool here) and nothing else; backward
    runs each checkpointed layer's attention once more (a token-wise split never does)."""
    job = _job()
    model = _model(job)
    inputs, targets = _batch()
    runtime = _apply(model, [checkpointed(i, True) for i in range(3)])
    calls = []
    attend = Attention.attend
    monkeypatch.setattr(Attention, "attend", lambda self, *a, **k: calls.append(1) or attend(self, *a, **k))
    loss = model(inputs, targets=targets)
    assert len(calls) == 3
    assert [sorted(record.roles) for record in runtime.pending] == [["layer_input"]] * 3
    element = next(model.parameters()).element_size()
    # layer 0's input is the embedding's output: looked up again in its replay, not kept
    assert runtime.pool.bytes == 2 * BATCH * SEQ_LEN * job.model.hidden_size * element
    assert runtime.pending[0].roles["layer_input"].again is not None
    loss.backward()
    assert len(calls) == 6 and not runtime.pending


@pytest.mark.parametrize("partitioned", [False, True])
def test_layer_0s_input_is_looked_up_again_bitwise_unless_the_embedding_is_partitioned(partitioned, monkeypatch):
    """Replayed whole, layer 0 keeps nothing of its input (the embedding's output): the replay looks the ids up
    again, and the loss and every gradient (the embedding's too) are bitwise those of keeping it. A ZeRO-3
    partitioned embedding (`ds_id`) is whole only inside its call: the input is kept then, as the planner counts
    (`spec.activations.input_looked_up_again`). ~1 s."""
    job = _job()
    inputs, targets = _batch()
    kept = _model(job)
    kept_runtime = _apply(kept, [checkpointed(i, False) for i in range(3)])
    kept.embed._forward_hooks.clear()  # the runtime as before: every input kept
    reference = loss_and_grads(kept, inputs, targets)
    assert kept_runtime.embedding is None
    looked_up = _model(job)
    if partitioned:
        looked_up.embed.weight.ds_id = 0
    runtime = _apply(looked_up, [checkpointed(i, False) for i in range(3)])
    stores = []
    finalize = tokenwise._LayerHooks._finalize_checkpointed

    def record_store(hooks):
        finalize(hooks)
        stores.append(hooks.record.roles["layer_input"])

    monkeypatch.setattr(tokenwise._LayerHooks, "_finalize_checkpointed", record_store)
    _assert_bitwise(reference, loss_and_grads(looked_up, inputs, targets))
    assert [store.again is not None for store in stores] == [not partitioned, False, False]
    assert (stores[0].whole is None) == (not partitioned)
    assert not runtime.pending
    alive = []  # after the forward: one layer input less when it is looked up again (less the ids it keeps)
    for model in (kept, looked_up):
        with StorageTracker() as tracker:
            loss = model(inputs, targets=targets)
        alive.append(tracker.live_bytes())
        loss.backward()
    layer_input = BATCH * SEQ_LEN * job.model.hidden_size * next(kept.parameters()).element_size()
    if partitioned:
        assert alive[0] == alive[1]
    else:
        assert alive[0] - alive[1] == pytest.approx(layer_input - inputs.numel() * 8, abs=64)


def test_a_replayed_layers_host_input_is_fetched_when_its_backward_starts(monkeypatch):
    """Not one layer ahead (the planner counts one input in flight in backward): every fetch is of the layer whose
    backward is starting; a split layer below a replayed one is still prefetched."""
    job = _job()
    model = _model(job)
    inputs, targets = _batch()
    runtime = _apply(model, [LayerPlan(0, 0.0, 0.5, 0.5, True), checkpointed(1, True), checkpointed(2, True)])
    fetched, materialize = [], tokenwise._materialize
    start_fetch = tokenwise._start_fetch
    monkeypatch.setattr(tokenwise, "_start_fetch", lambda rt, record: fetched.append(record.layer_index)
                        or start_fetch(rt, record))
    started = []
    monkeypatch.setattr(tokenwise, "_materialize", lambda rt, record, group: (
        started.append(record.layer_index) if not record.materialized else None) or materialize(rt, record, group))
    loss_and_grads(model, inputs, targets)
    assert started == [2, 1, 0]
    assert fetched == [2, 1, 0, 0]  # each at its own start; layer 0 (split) also prefetched during layer 1's
    assert not runtime.pending


@pytest.mark.parametrize("input_on_host", [False, True])
def test_a_replayed_layer_frees_its_tensors_when_its_backward_ends(input_on_host, monkeypatch):
    """By reference counting, not by Python's cyclic collector: the replay's hooks once held their own capture list
    in a cycle, so every replayed layer's input outlived its backward until the collector ran (in the trainer tens
    of layers later: +37.6 GiB over the plan on a lent H200 at 320K). With the collector off, the bytes alive when
    each layer's replay starts do not grow from layer to layer, and a collection after the step frees nothing."""
    job = _job("model.num_layers=4")
    model = _model(job)
    inputs, targets = _batch()
    _apply(model, [checkpointed(i, input_on_host) for i in range(4)])
    loss_and_grads(model, inputs, targets)  # the host pool's buffers are made in the first step
    tracker, at_replay, replayed = StorageTracker(), [], tokenwise._replayed

    def replay_and_count(runtime, record, index):
        if record.replayed is None:  # activations alive: less the weight gradients of the layers done
            grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
            at_replay.append(tracker.live_bytes() - grads)
        return replayed(runtime, record, index)

    monkeypatch.setattr(tokenwise, "_replayed", replay_and_count)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with tracker:
            loss_and_grads(model, inputs, targets)
        after_step = tracker.live_bytes()
        gc.collect()
        assert tracker.live_bytes() == after_step
    finally:
        if collecting:
            gc.enable()
    layer_input = BATCH * SEQ_LEN * job.model.hidden_size * next(model.parameters()).element_size()
    assert len(at_replay) == 4, at_replay
    assert all(later - earlier < layer_input / 2 for earlier, later in zip(at_replay, at_replay[1:])), at_replay


def test_apply_plan_installs_it_from_a_plan_and_logs_it(caplog):
    job = _job()
    model = _model(job)
    plan = plan_with_layers([checkpointed(0, True), checkpointed(1, False), LayerPlan(2)])
    with caplog.at_level("INFO", logger="longtrain.memory"):
        applied = apply_plan(model, plan, job.compression, job.token_elim, job.train)
    assert applied.split_layers == {0, 1}
    assert "whole layer checkpointed, input on host: layers 0" in caplog.text
    assert "input on gpu: layers 1" in caplog.text


def test_a_checkpointed_layer_is_not_also_compressed():
    job = _job("compression.linear_inputs=int8", "compression.layers=[2]")
    plan = plan_with_layers([LayerPlan(0), LayerPlan(1), checkpointed(2, True)])
    with pytest.raises(PlanError, match=r"checkpoints layers \[2\] whole"):
        check_plan_composes(plan, job, "plan.yaml")
