"""Token elimination under a token-wise swap/recompute plan (CPU): the sparse layers give the gradients of the same
sparse model without the plan, their recomputation reuses the kept indices of the forward (never re-scores), and the
plan's shares apply to the kept rows of the attention half."""

import copy

import pytest
import torch

from orchestrator.config import load_job_config
from orchestrator.memory import token_elim
from orchestrator.memory.tokenwise import LayerPolicy, apply_policies
from orchestrator.model import LlamaModel

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
    token_elim.apply_elimination(model, RATIOS, BLOCK)
    tokens = torch.randint(0, 256, (BATCH, SEQ_LEN + 1))
    return model, tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model, inputs, targets):
    model.zero_grad(set_to_none=True)
    loss = model(inputs, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


SPLITS = {
    "swap all": LayerPolicy(0.0, 1.0, 0.0),
    "recompute all": LayerPolicy(0.0, 0.0, 1.0),
    "three ways": LayerPolicy(0.25, 0.25, 0.5),
    "skeletal to host, rest recomputed": LayerPolicy(0.3, 0.0, 0.7, offload_skeletal=True),
}


@pytest.mark.parametrize("name", SPLITS)
def test_sparse_layers_under_a_plan_give_the_gradients_of_the_sparse_model_without_it(name):
    model, inputs, targets = _sparse_model_and_batch()
    reference_loss, reference = _loss_and_grads(model, inputs, targets)
    kept_plain = [model.layers[i].token_elim.last_kept for i in RATIOS]
    assert not torch.equal(kept_plain[0][0], kept_plain[0][1])  # the two sequences keep different blocks
    planned = copy.deepcopy(model)
    runtime = apply_policies(planned, {i: SPLITS[name] for i in range(4)})
    runtime.recompute_chunk_tokens = 48  # chunks that cut the kept sequence and the blocks anywhere
    for _ in range(2):  # the second step reuses the host buffers
        loss, grads = _loss_and_grads(planned, inputs, targets)
        assert all(torch.equal(planned.layers[i].token_elim.last_kept, kept) for i, kept in zip(RATIOS, kept_plain))
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-7)
        for key in reference:  # not bitwise: under a plan the attention norm's backward sums over every row
            torch.testing.assert_close(grads[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)


def test_recomputation_reuses_the_kept_indices_and_never_rescores(monkeypatch):
    """After the forward the scorer is made to choose other blocks: gradients still equal the plain sparse run's
    (a recomputation that re-scored would recompute other rows), and it is not called during backward."""
    model, inputs, targets = _sparse_model_and_batch()
    reference_loss, reference = _loss_and_grads(model, inputs, targets)
    planned = copy.deepcopy(model)
    apply_policies(planned, {i: LayerPolicy(0.0, 0.0, 1.0) for i in range(4)})
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
    runtime = apply_policies(model, {i: LayerPolicy(0.0, 1.0, 0.0) for i in range(4)})
    model(inputs, targets=targets).backward()
    tokens = {(key[0], key[1]): buffer.numel() for key, buffer in runtime.pool.buffers.items()}
    for layer, ratio in {0: 1.0, **RATIOS}.items():
        for role in ("attn_norm_out", "q", "k", "v"):
            assert tokens[layer, role] == ratio * tokens[0, role]
        for role in ("attn_residual", "gate", "gated"):
            assert tokens[layer, role] == tokens[0, role]
