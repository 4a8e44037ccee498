"""Where each buffer of a lifetime schedule goes in one arena: the best-fit placement and its lower bound.

Why in the contract: the planner's static arena (`planner.layout`, which tries a MIP when this is above the bound)
and the runtime's layout of a traced step (`orchestrator.memory.traced_layout`) place buffers the same way, so
what the planner predicts for an arena is what a worker lays out; a worker loads no solver.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence


@dataclass
class Buffer:
    """A tensor's bytes over a lifetime [start, end) in event indices of a schedule."""

    name: str
    layer: int
    size_bytes: int
    start: int
    end: int
    offset_bytes: int = 0

    def overlaps_in_time(self, other: "Buffer") -> bool:
        return self.start < other.end and other.start < self.end


def lower_bound(buffers: Sequence[Buffer]) -> int:
    """The most bytes live at any event: no layout can use less."""
    events = sorted({b.start for b in buffers})
    return max((sum(b.size_bytes for b in buffers if b.start <= t < b.end) for t in events), default=0)


GREEDY_ORDERS = {
    "largest first": lambda b: (-b.size_bytes, b.start),
    "longest-lived first": lambda b: (-(b.end - b.start), -b.size_bytes, b.start),
    "largest area first": lambda b: (-(b.end - b.start) * b.size_bytes, b.start),
}


def best_fit(buffers: Sequence[Buffer]) -> Dict[int, int]:
    """The smallest of best-fit placements in a few orders (each buffer at the lowest gap free in its life)."""
    candidates = [_place_in_order(buffers, key) for key in GREEDY_ORDERS.values()]
    return min(candidates, key=lambda offsets: arena_size(buffers, offsets))


def _place_in_order(buffers: Sequence[Buffer], key) -> Dict[int, int]:
    order = sorted(range(len(buffers)), key=lambda i: (*key(buffers[i]), i))
    offsets: Dict[int, int] = {}
    for i in order:
        busy = sorted((offsets[j], offsets[j] + buffers[j].size_bytes) for j in offsets
                      if buffers[i].overlaps_in_time(buffers[j]))
        offsets[i] = _lowest_gap(busy, buffers[i].size_bytes)
    return offsets


def _lowest_gap(busy: List[tuple], size: int) -> int:
    candidate = 0
    for low, high in busy:
        if candidate + size <= low:
            return candidate
        candidate = max(candidate, high)
    return candidate


def arena_size(buffers: Sequence[Buffer], offsets: Dict[int, int]) -> int:
    return max((offsets[i] + b.size_bytes for i, b in enumerate(buffers)), default=0)
