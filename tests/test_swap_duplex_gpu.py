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


def test_a_held_source_is_taken_back_without_waiting_for_its_copy():
    """The last layer's backward reads its swapped slices where they still are: the source itself, no longer held
    (freed when its reader drops it), and nothing left for `backward_started` to wait for."""
    swap = SwapStream(max_layers_ahead=8)
    hosts = [host_empty((ELEMENTS // 4,), torch.bfloat16, pin=True) for _ in range(2)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    swap.forward_starts()
    sources = [torch.full((ELEMENTS // 4,), float(v), device="cuda", dtype=torch.bfloat16) for v in (1, 2)]
    torch.cuda._sleep(200_000_000)  # the copies out cannot have ended below
    for host, source in zip(hosts, sources):
        swap.copy_out(host, source)
    addresses = [s.data_ptr() for s in sources]
    del sources, source  # the loop variable holds the last one
    taken = swap.take_held([hosts[0].data_ptr()])
    assert list(taken) == [hosts[0].data_ptr()] and taken[hosts[0].data_ptr()].data_ptr() == addresses[0]
    assert len(swap.sources) == 1 and swap.sources[0][3] == hosts[1].data_ptr()  # the other one is still held
    value = taken.pop(hosts[0].data_ptr()).float().max().item()
    assert value == 1.0
    torch.cuda.synchronize()
    swap.backward_started()
    assert torch.cuda.memory_allocated() == before
    assert hosts[1].float().min().item() == 2.0


def test_the_last_layer_read_from_its_held_sources_gives_the_plain_gradients():
    """Every token swapped in every layer, the device kept busy so that the last layer's copies out are still
    running when its backward starts: its slices are taken from the device (`take_held`), the other layers' come
    back over PCIe, and the gradients are the plain run's (to the bf16 tolerance of `test_gpu`)."""
    from tests.test_gpu import _loss_and_grads, _small_pair, _worst

    plain, memo, runtime = _small_pair(2048, (0.0, 1.0, 0.0, True))
    tokens = torch.randint(0, 256, (2, 2049), device="cuda")
    expected = _loss_and_grads(plain, tokens)
    _loss_and_grads(memo, tokens)  # the host buffers and streams exist from here on
    runtime.swap.max_layers_ahead = 64  # the host queues the whole step while the device sleeps
    taken = []
    take_held = runtime.swap.take_held
    runtime.swap.take_held = lambda addresses: taken.append(take_held(addresses)) or taken[-1]
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    ours = _loss_and_grads(memo, tokens)
    assert len(taken) == 1 and len(taken[0]) > 0, taken  # only the last layer is fetched at its backward start
    assert torch.allclose(expected[0], ours[0], rtol=1e-3) and _worst(expected, ours) < 5e-3
