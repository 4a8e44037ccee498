"""Ulysses sequence parallelism (DeepSpeed's all-to-all) gives the unsplit model's loss and gradients, on both
attention paths: DeepSpeed's DistributedAttention (plain layers) and the shard-saving path under a token-wise
swap / recompute plan. Two gloo ranks on CPU, fp32."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port, layer_plans
from spec.config import ModelConfig
from orchestrator.process_group import init_process_group
from orchestrator.memory import tokenwise
from orchestrator.model import LlamaModel
from spec.parallel import ParallelDims
from orchestrator.sequence_parallel import install, sequence_groups, shard_of

MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
SEQ = 48
POLICIES = {1: (0.25, 0.5, 0.25), 2: (0.5, 0.0, 0.5, True)}
"""Split layers: keep, swap, recompute[, skeletal to host]."""


def _batch():
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (2, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _model(with_plan: bool, device: str = "cpu"):
    torch.manual_seed(3)
    model = LlamaModel(MODEL)
    if device != "cpu":
        model = model.to(device, torch.bfloat16)
    if with_plan:
        tokenwise.apply(model, tokenwise.Config(), layer_plans(POLICIES))
    return model


def _loss_and_grads(model, inputs, targets, positions=None):
    loss = model(inputs, targets=targets, positions=positions)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, world, port, with_plan, out_path, device="cpu"):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    # DeepSpeed's all-to-all runs on its own comm layer
    init_process_group(use_cuda=device != "cpu")
    torch.set_num_threads(1)
    group = sequence_groups(ParallelDims(world_size=world, sp_degree=world, seq_len=SEQ))
    model = _model(with_plan, device)
    install(model, group, split_layers=set(POLICIES) if with_plan else set())
    inputs, targets = (t.to(device) for t in _batch())
    shard = shard_of(inputs, group)
    positions = torch.arange(SEQ, device=device)[shard]
    loss, grads = _loss_and_grads(model, inputs[:, shard], targets[:, shard], positions)
    dist.all_reduce(loss)
    for grad in grads.values():  # what ZeRO does: the average over ranks
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save((loss.item() / world, {k: g.float().cpu() for k, g in grads.items()}), out_path)  # a file: a queue's pipe fills and blocks the rank
    dist.barrier()
    dist.destroy_process_group()


def _run_split(with_plan: bool, tmp_path, device: str = "cpu"):
    out_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, free_port(), with_plan, out_path, device), nprocs=2, start_method="spawn")
    return torch.load(out_path)


def _check_equal_to_unsplit(with_plan: bool, tmp_path):
    inputs, targets = _batch()
    torch.set_num_threads(1)
    reference_loss, reference = _loss_and_grads(_model(with_plan=False), inputs, targets)
    loss, grads = _run_split(with_plan, tmp_path)
    assert abs(loss - reference_loss.item()) < 1e-6
    for name, grad in reference.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def test_ulysses_with_deepspeed_distributed_attention_equals_the_unsplit_model(tmp_path):
    _check_equal_to_unsplit(False, tmp_path)


def test_ulysses_under_a_swap_and_recompute_plan_equals_the_unsplit_model(tmp_path):
    _check_equal_to_unsplit(True, tmp_path)


@pytest.mark.parametrize("backend", ["default", "math"])
def test_shard_saving_attention_keeps_no_whole_sequence_tensor_and_matches_sdpa(tmp_path, backend):
    """In a one-rank group (the exchanges are identities): SDPA's node keeps its q, k, v and output only by name,
    the exchanged copies are freed after the forward, and gradients equal plain SDPA's bit for bit, whichever
    kernel SDPA picks (the math one, used only where no fused kernel applies, saves copies it derived and its
    probabilities: still exact, but not lean)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from orchestrator.sequence_parallel import LocalShardAttention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    init_process_group(use_cuda=False)
    try:
        group = dist.new_group([0])
        q, k, v = (torch.randn(1, 4, 64, 8, requires_grad=True) for _ in range(3))
        with sdpa_kernel(SDPBackend.MATH) if backend == "math" else nullcontext():
            out = LocalShardAttention(group, "sdpa")(q, k, v)
            leaves, out_heads, regathered = out.grad_fn.inner
            if backend == "default":  # the math kernel saves scaled / transposed copies: correct, not lean
                assert sorted(role for _, role, _ in regathered.saved if role) == ["k", "out", "q", "v"]
                assert all(t is None or t.numel() < q.numel() for t, _, _ in regathered.saved)
            assert all(t.untyped_storage().size() == 0 for t in (*leaves, out_heads))
            reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            grad = torch.randn_like(reference)
            expected = torch.autograd.grad(reference, (q, k, v), grad)
            got = torch.autograd.grad(out, (q, k, v), grad)
        assert torch.equal(out, reference)
        for mine, want in zip(got, expected):
            assert torch.equal(mine, want)
    finally:
        dist.destroy_process_group()
