"""Compression composed with MEMO's token-wise swap and recompute: the plan splits the compact forms (int8 codes,
packed 4-bit codes, sampled rows) by token, so the gradients are those of the same compressed model without a plan
and the host bytes fall by the compression factor."""

import copy
from dataclasses import replace

import pytest
import torch

from spec.config import load_job_config
from orchestrator.memory import compressed, tokenwise
from orchestrator.model import LlamaModel
from tests.conftest import layer_plans, loss_and_grads

SEQ_LEN = 256
SETTINGS = {
    "mesa int8": ["compression.linear_inputs=int8", "compression.norm_inputs=int8", "compression.silu=int8"],
    "s2a int4": ["compression.silu=int4"],
    "wta-crs": ["compression.wta_crs_keep_ratio=0.3"],
    "all": ["compression.linear_inputs=int8", "compression.norm_inputs=int8", "compression.silu=int4",
            "compression.wta_crs_keep_ratio=0.5"],
}
SPLITS = {  # per layer: keep, swap, recompute[, skeletal to host]
    "three ways": [(0.25, 0.25, 0.5)] * 4,
    "recompute all, skeletal to host": [(0.0, 0.0, 1.0, True)] * 4,
    "mixed per layer": [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.3, 0.0, 0.7), (0.5, 0.3, 0.2)],
}


def _compressed_model(overrides, batch: int, dtype=torch.float32):
    torch.manual_seed(0)
    job = load_job_config(None, [f"data.seq_len={SEQ_LEN}"] + overrides)
    model = LlamaModel(job.model).to(dtype)
    compressed.apply(model, compressed.Config(job.compression, seed=3), job.compression.layer_indices(4))
    tokens = torch.randint(0, 256, (batch, SEQ_LEN + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def _split(model, decisions):
    return tokenwise.apply(model, tokenwise.Config(), layer_plans(decisions))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_a_plan_does_not_change_the_compressed_gradients(setting, split):
    """Two steps (the second moves the ranges and draws new samples): equal to the last bit, so the recomputed
    codes and rows are the stored ones (same ranges, same seed, same sample)."""
    model, inputs, targets = _compressed_model(SETTINGS[setting], batch=2 if setting != "s2a int4" else 1)
    planned = copy.deepcopy(model)
    runtime = _split(planned, SPLITS[split])
    for _ in range(2):
        reference_loss, reference = loss_and_grads(model, inputs, targets)
        loss, grads = loss_and_grads(planned, inputs, targets)
        assert torch.equal(loss, reference_loss)
        for key in reference:
            assert torch.equal(grads[key], reference[key]), key
    assert any(role.endswith(".compact") for (_, role, *_) in runtime.pool.buffers) or split.startswith("recompute")


def _host_bytes_by_role(runtime) -> dict:
    totals = {}
    for (_, role, *_), buffer in runtime.pool.buffers.items():
        totals[role] = totals.get(role, 0) + buffer.numel() * buffer.element_size()
    return totals


def test_swapped_bytes_fall_by_the_compression_factor():
    """bf16, everything swapped: the compact roles cross PCIe as 1 byte (int8), half a byte (int4) or the sampled
    share of the rows (plus nothing else: ranges, indices and weights stay on the device)."""
    policies = [(0.0, 1.0, 0.0)] * 4
    plain, inputs, targets = _compressed_model([], batch=1, dtype=torch.bfloat16)
    plain_runtime = _split(plain, policies)
    loss_and_grads(plain, inputs, targets)
    exact = _host_bytes_by_role(plain_runtime)
    for overrides, role, source, factor in (
            (["compression.linear_inputs=int8"], "mlp_norm_out.compact", "mlp_norm_out", 2),
            (["compression.silu=int4"], "gate.compact", "gate", 4),
            (["compression.wta_crs_keep_ratio=0.25"], "gated.compact", "gated", 4)):
        model, _, _ = _compressed_model(overrides, batch=1, dtype=torch.bfloat16)
        runtime = _split(model, policies)
        loss_and_grads(model, inputs, targets)
        ours = _host_bytes_by_role(runtime)
        print(f"{overrides[0]}: {source} {exact[source]} B -> {role} {ours[role]} B on the host")
        assert source not in ours and ours[role] * factor == exact[source]


def test_token_elimination_is_still_refused_on_compressed_split_layers():
    """Refused with the plan, on the driver (`spec.plan.check_plan_composes`), whether the job's section or the
    plan itself compresses the sparse split layers; compression alone composes with the split."""
    from types import SimpleNamespace

    from spec.plan import PlanError, check_plan_composes, compression_spec

    job = load_job_config(None, [f"data.seq_len={SEQ_LEN}", *SETTINGS["all"]])
    split = SimpleNamespace(layers=layer_plans([(0.5, 0.5, 0.0)] * 4))
    check_plan_composes(split, job, "p.yaml")  # compression composes: no error
    elim = load_job_config(None, [f"data.seq_len={SEQ_LEN}", "token_elim.enabled=true", *SETTINGS["all"]])
    with pytest.raises(PlanError, match="token_elim"):
        check_plan_composes(split, elim, "p.yaml")
    planned = SimpleNamespace(layers=[replace(layer, activation_compression=compression_spec(job.compression))
                                      for layer in split.layers])
    with pytest.raises(PlanError, match="token_elim"):
        check_plan_composes(planned, load_job_config(None, [f"data.seq_len={SEQ_LEN}", "token_elim.enabled=true"]),
                            "p.yaml")


def _live_bytes(model, dtype=None) -> int:
    import gc

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or (dtype is not None and obj.dtype != dtype):
                continue
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, ReferenceError):  # torch.compile's fake tensors and dead weak proxies, left by an
            continue  # earlier test's tracing: no memory of this process's tensors
        if pointer not in parameters:
            storages[pointer] = storage.nbytes()
    return sum(storages.values())


def test_recomputed_codes_are_not_kept_and_nothing_survives_a_step():
    """Under 'recompute all' no code byte stays after the forward (the stores must not hold the full codes), and
    a step leaves nothing behind, freed by reference counting alone."""
    import gc

    model, inputs, targets = _compressed_model(SETTINGS["all"], batch=2)
    without_plan = _live_bytes(model, torch.uint8)
    loss = model(inputs, targets=targets)
    assert _live_bytes(model, torch.uint8) - without_plan > 0
    del loss
    _split(model, [(0.0, 0.0, 1.0)] * 4)
    loss = model(inputs, targets=targets)
    assert _live_bytes(model, torch.uint8) == without_plan
    loss.backward()
    gc.collect()
    gc.disable()
    try:
        loss_and_grads(model, inputs, targets)
        settled = _live_bytes(model)
        loss_and_grads(model, inputs, targets)
        assert _live_bytes(model) == settled
    finally:
        gc.enable()
