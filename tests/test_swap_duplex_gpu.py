"""The swap's two copy streams (one each way) on a GPU (skipped without CUDA; run on a lent GPU machine): a prefetch
reads what the copy out of its host buffer wrote, a copy out into a buffer waits for the prefetch still reading it,
and a copy out and a prefetch of other buffers overlap in time.

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
