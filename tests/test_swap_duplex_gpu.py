"""The swap's two copy streams (one each way) on a GPU (skipped without CUDA; run on a lent GPU machine): a prefetch
reads what the copy out of its host buffer wrote, a copy out into a buffer waits for the prefetch still reading it,
a copy out and a prefetch of other buffers overlap in time, and a copied-out tensor's memory is counted while its
copy runs and reusable once it has ended (never freed behind the allocator's statistics).

    python -m pytest -q -m gpu tests/test_swap_duplex_gpu.py
"""

import time

import pytest
import torch

from orchestrator.memory.host_slab import host_empty
from orchestrator.memory.swap_stream import SwapStream
from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

ELEMENTS = 256 * 2**20  # 512 MiB of bf16: ~10 ms each way over PCIe, long enough for a missing wait to show


def _filled(value: float) -> torch.Tensor:
    return torch.full((ELEMENTS,), value, device="cuda", dtype=torch.bfloat16)


def test_a_prefetch_reads_what_the_copy_out_of_its_buffer_wrote():
    swap = SwapStream(max_layers_ahead=8)
    host = host_empty((ELEMENTS,), torch.bfloat16, pin=True)
    for value in (1.0, 2.0, 3.0):
        swap.copy_out(host, _filled(value))
        targets, fetched = swap.prefetch({"x": (host, torch.device("cuda"))})
        swap.wait(fetched)
        assert targets["x"].min().item() == targets["x"].max().item() == value


def test_a_copy_out_waits_for_the_prefetch_still_reading_its_buffer():
    swap = SwapStream(max_layers_ahead=8)
    host = host_empty((ELEMENTS,), torch.bfloat16, pin=True)
    swap.copy_out(host, _filled(1.0))
    torch.cuda.synchronize()
    targets, fetched = swap.prefetch({"x": (host, torch.device("cuda"))})
    swap.copy_out(host, _filled(2.0))  # the next step's copy out into the same buffer
    swap.wait(fetched)
    assert targets["x"].min().item() == targets["x"].max().item() == 1.0
    torch.cuda.synchronize()
    assert host.float().min().item() == 2.0


def test_a_copy_out_and_a_prefetch_of_other_buffers_overlap():
    """Both directions at once take less than one after the other (each engine moves its own direction)."""
    swap = SwapStream(max_layers_ahead=8)
    outgoing, incoming = (host_empty((ELEMENTS,), torch.bfloat16, pin=True) for _ in range(2))
    source = _filled(1.0)
    swap.copy_out(incoming, source)
    torch.cuda.synchronize()

    def timed(run) -> float:
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        return best

    out_alone = timed(lambda: swap.copy_out(outgoing, source))
    in_alone = timed(lambda: swap.prefetch({"x": (incoming, torch.device("cuda"))}))
    both = timed(lambda: (swap.copy_out(outgoing, source), swap.prefetch({"x": (incoming, torch.device("cuda"))})))
    assert both < 0.85 * (out_alone + in_alone), (both, out_alone, in_alone)


def test_the_block_a_slice_was_copied_out_of_is_reusable_at_once():
    """The slice is copied to its own block; the large tensor it came from is free for the next allocation even
    while the copy out waits behind the device (with `record_stream` the allocator kept the whole block until the
    out stream had passed, and reserved new memory)."""
    swap = SwapStream(max_layers_ahead=8)
    host = host_empty((ELEMENTS // 8,), torch.bfloat16, pin=True)
    large = _filled(1.0)
    address = large.data_ptr()
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    torch.cuda._sleep(200_000_000)  # the device is busy: the copy out cannot have ended below
    swap.copy_out(host, large[: ELEMENTS // 8])
    del large
    again = torch.empty((ELEMENTS,), device="cuda", dtype=torch.bfloat16)
    assert again.data_ptr() == address
    assert torch.cuda.memory_reserved() <= reserved + (ELEMENTS // 8) * 2 + 2**21  # the slice's block at most
    torch.cuda.synchronize()
    assert host.float().min().item() == host.float().max().item() == 1.0


def test_a_copied_out_tensor_stays_allocated_until_its_copy_ends():
    swap = SwapStream(max_layers_ahead=8)
    host = host_empty((ELEMENTS,), torch.bfloat16, pin=True)
    source = _filled(3.0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda._sleep(200_000_000)
    swap.copy_out(host, source)
    del source
    assert torch.cuda.memory_allocated() == before  # held by the swap, counted
    torch.cuda.synchronize()
    swap.release_copied()
    assert torch.cuda.memory_allocated() == before - ELEMENTS * 2
    assert host.float().min().item() == 3.0


def test_a_layers_sources_live_through_the_next_forward_and_no_longer():
    """Released when the forward after next starts, the compute stream waiting for their copy: a tensor that reuses
    the block is written only after the copy read it."""
    swap = SwapStream(max_layers_ahead=8)
    host = host_empty((ELEMENTS,), torch.bfloat16, pin=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    swap.forward_starts()  # layer 0
    source = _filled(3.0)
    torch.cuda._sleep(200_000_000)
    swap.copy_out(host, source)
    del source
    swap.forward_starts()  # layer 1: layer 0's source is still being copied
    assert torch.cuda.memory_allocated() == before + ELEMENTS * 2
    swap.forward_starts()  # layer 2
    assert torch.cuda.memory_allocated() == before
    overwrite = _filled(7.0)  # the freed block, written on the compute stream
    torch.cuda.synchronize()
    assert host.float().min().item() == host.float().max().item() == 3.0
    del overwrite
