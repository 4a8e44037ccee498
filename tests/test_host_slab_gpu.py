"""Pinned swap memory on a GPU machine (skipped without CUDA; run on a lent GPU machine): `host_empty` page-locks
exactly the bytes asked for (PyTorch's pinned allocator rounds a block up to a power of two; the test prints what
it takes for 1.5 GiB), the memory counts as pinned for asynchronous copies, and a slab pinned on its background thread serves a round trip to the GPU.

    python -m pytest -q -m gpu tests/test_host_slab_gpu.py
"""

import gc

import psutil
import pytest
import torch

from orchestrator.memory.host_slab import HostSlab, host_empty
from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

GIB = 2**30


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_pinned_memory_is_exactly_the_bytes_asked_for():
    torch.cuda.init()
    size = 3 * GIB // 2
    before = _rss()
    exact = host_empty((size,), torch.uint8, pin=True)
    grown = _rss() - before
    assert exact.is_pinned()
    assert abs(grown - size) < 0.05 * size, (grown, size)  # page-locking makes the pages resident, no more
    del exact
    gc.collect()
    before = _rss()
    rounded = torch.empty(size, dtype=torch.uint8, pin_memory=True)  # what the pool used before
    print(f"PyTorch's pinned allocator for {size / GIB:.2f} GiB: {(_rss() - before) / GIB:.2f} GiB resident")
    del rounded


def test_a_slab_round_trips_to_the_gpu():
    slab = HostSlab(256 * 2**20, pin=True)
    host = slab.take((1024, 1024), torch.bfloat16)
    assert host.is_pinned()
    device = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    host.copy_(device, non_blocking=True)
    back = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, device)
