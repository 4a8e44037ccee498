"""The best-fit placement (`spec.placement`) that the planner's arena and a worker's traced step share: its lookup of
the buffers alive together gives the placements of the plain definition (every placed buffer tested), and the
lower bound is the most bytes alive at once."""

import random

import pytest

from spec.placement import GREEDY_ORDERS, Buffer, _lowest_gap, greedy_order, lower_bound, place_in_order


def _placed_by_definition(buffers, order):
    offsets = {}
    for i in order:
        busy = sorted((offsets[j], offsets[j] + buffers[j].size_bytes) for j in offsets
                      if buffers[i].overlaps_in_time(buffers[j]))
        offsets[i] = _lowest_gap(busy, buffers[i].size_bytes)
    return offsets


def _buffers(seed: int):
    """Random lifetimes on a short timeline (many share a start or an end), some of no length."""
    rng = random.Random(seed)
    buffers = []
    for i in range(rng.randint(0, 120)):
        start = rng.randint(0, 60)
        buffers.append(Buffer(str(i), 0, rng.randint(1, 16) * 512, start, start + rng.choice([0, 1, 2, 5, 20, 60])))
    return buffers


@pytest.mark.parametrize("seed", range(40))
def test_placements_are_those_of_testing_every_placed_buffer(seed):
    buffers = _buffers(seed)
    for key in GREEDY_ORDERS.values():
        order = greedy_order(buffers, key)
        assert place_in_order(buffers, order) == _placed_by_definition(buffers, order)
    at_each_start = [sum(b.size_bytes for b in buffers if b.start <= t < b.end) for t in {b.start for b in buffers}]
    assert lower_bound(buffers) == max(at_each_start, default=0)
