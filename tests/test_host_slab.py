"""The swap's host memory (orchestrator/memory/host_slab.py): a plan's share allocated up front in one slab on a
background thread, buffers carved as aligned, disjoint views in first-use order, what does not fit allocated on its
own and counted, an allocation failure reported where a buffer is asked for; through the token-wise runtime the
gradients stay bitwise the plain run's and every swap buffer lives in the slab. Pinning itself (byte for byte, no
power-of-two rounding) needs CUDA: tests/test_host_slab_gpu.py."""

import copy

import pytest
import torch

from orchestrator.memory import tokenwise
from orchestrator.memory.host_slab import ALIGNMENT, HostSlab
from spec.config import load_job_config
from orchestrator.model import LlamaModel
from tests.conftest import layer_plans, loss_and_grads


def test_buffers_are_aligned_disjoint_views_and_what_does_not_fit_is_counted():
    slab = HostSlab(4096, pin=False)
    a = slab.take((3, 5), torch.bfloat16)  # 30 bytes
    b = slab.take((7,), torch.float32)  # 28 bytes, at the next aligned offset
    base = slab.ready().data_ptr()
    assert a.data_ptr() == base and b.data_ptr() == base + ALIGNMENT
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() == base
    a.fill_(1), b.fill_(2)
    assert (a == 1).all() and (b == 2).all()
    big = slab.take((4096,), torch.uint8)  # no room left: its own tensor
    assert big.untyped_storage().data_ptr() != base and slab.fallback_bytes == 4096
    assert big.shape == (4096,) and big.dtype == torch.uint8


def test_an_allocation_that_fails_is_reported_where_a_buffer_is_asked_for():
    slab = HostSlab(2**62, pin=False)
    with pytest.raises(RuntimeError, match=r"could not allocate 4294967296.0 GiB of host memory for the plan's swap"):
        slab.take((1,), torch.uint8)


def test_the_runtime_carves_its_swap_buffers_from_the_slab_and_stays_exact():
    torch.manual_seed(0)
    job = load_job_config(None, ["data.seq_len=128"])
    model = LlamaModel(job.model)
    tokens = torch.randint(0, 256, (2, 129))
    reference = loss_and_grads(model, tokens[:, :-1], tokens[:, 1:])
    split = copy.deepcopy(model)
    decisions = [(0.25, 0.5, 0.25), (0.0, 1.0, 0.0, True), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5)]
    runtime = tokenwise.apply(split, tokenwise.Config(host_bytes=64 * 2**20), layer_plans(decisions))
    for _ in range(2):  # the second step reuses the buffers
        loss, grads = loss_and_grads(split, tokens[:, :-1], tokens[:, 1:])
        assert torch.equal(loss, reference[0]) and all(torch.equal(grads[k], reference[1][k]) for k in grads)
    slab = runtime.pool.slab
    assert runtime.pool.buffers and slab.fallback_bytes == 0
    assert {b.untyped_storage().data_ptr() for b in runtime.pool.buffers.values()} == {slab.ready().data_ptr()}
    assert slab.offset >= runtime.pool.bytes
