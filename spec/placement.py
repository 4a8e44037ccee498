"""Where each buffer of a lifetime schedule goes in one arena: the best-fit placement and its lower bound.

Why in the contract: the planner's static arena (`planner.layout`, which tries a MIP when this is above the bound)
and the runtime's layout of a traced step (`orchestrator.memory.traced_layout`) place buffers the same way, so
what the planner predicts for an arena is what a worker lays out; a worker loads no solver.
"""

import bisect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence


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
    """The most bytes live at any event: no layout can use less (a sweep: at one time, ends before starts)."""
    changes = sorted([(b.start, 1, b.size_bytes) for b in buffers] + [(b.end, 0, -b.size_bytes) for b in buffers])
    live = peak = 0
    for _, _, delta in changes:
        live += delta
        peak = max(peak, live)
    return peak


GREEDY_ORDERS = {
    "largest first": lambda b: (-b.size_bytes, b.start),
    "longest-lived first": lambda b: (-(b.end - b.start), -b.size_bytes, b.start),
    "largest area first": lambda b: (-(b.end - b.start) * b.size_bytes, b.start),
}


PlaceInOrder = Callable[[Sequence[Buffer], Sequence[int]], Dict[int, int]]
"""Offsets of the buffers placed one at a time in the given order of their indices (`place_in_order`)."""


def best_fit(buffers: Sequence[Buffer], place: Optional[PlaceInOrder] = None) -> Dict[int, int]:
    """The smallest of best-fit placements in a few orders (each buffer at the lowest gap free in its life);
    `place`: another implementation of `place_in_order` (the replay allocator's C++ one, for traced steps)."""
    place = place or place_in_order
    candidates = [place(buffers, greedy_order(buffers, key)) for key in GREEDY_ORDERS.values()]
    return min(candidates, key=lambda offsets: arena_size(buffers, offsets))


def greedy_order(buffers: Sequence[Buffer], key) -> List[int]:
    """The buffers' indices sorted by one of GREEDY_ORDERS (ties by index)."""
    return sorted(range(len(buffers)), key=lambda i: (*key(buffers[i]), i))


def place_in_order(buffers: Sequence[Buffer], order: Sequence[int]) -> Dict[int, int]:
    """Each buffer in turn at the lowest gap free among the placed buffers alive with it."""
    offsets: Dict[int, int] = {}
    placed = _PlacedInTime(max((b.end for b in buffers), default=0) + 1)
    for i in order:
        offsets[i] = _lowest_gap(sorted(placed.overlapping(buffers[i])), buffers[i].size_bytes)
        placed.add(buffers[i], offsets[i])
    return offsets


class _PlacedInTime:
    """The address ranges of the buffers placed so far, found by lifetime: those alive at a buffer's start (a
    segment tree over event indices, each lifetime stored at O(log T) nodes) and those starting within its life (a
    sorted list); together exactly the lifetimes that overlap it (`Buffer.overlaps_in_time`). Why: a traced step
    has ~10^4 requests per few layers, and testing every placed buffer for each new one took 16 s for 7,200 of them
    on a 2-core machine (this: 2.8 s, the same placements)."""

    def __init__(self, length: int):
        self.leaves = 1 << max(length - 1, 0).bit_length()
        self.nodes: Dict[int, List[tuple]] = {}
        self.starts: List[tuple] = []
        self.placed: List[tuple] = []
        """(buffer, span) of every placed buffer, for a buffer of no lifetime (rare: scanned)."""

    def add(self, buffer: Buffer, offset: int) -> None:
        span = (offset, offset + buffer.size_bytes)
        low, high = buffer.start + self.leaves, buffer.end + self.leaves
        while low < high:
            if low & 1:
                self.nodes.setdefault(low, []).append(span)
                low += 1
            if high & 1:
                high -= 1
                self.nodes.setdefault(high, []).append(span)
            low, high = low >> 1, high >> 1
        bisect.insort(self.starts, (buffer.start, span))
        self.placed.append((buffer, span))

    def overlapping(self, buffer: Buffer) -> List[tuple]:
        """The address ranges (low, high) of the placed buffers whose lifetimes overlap `buffer`'s."""
        if buffer.end <= buffer.start:
            return [span for other, span in self.placed if buffer.overlaps_in_time(other)]
        found: List[tuple] = []
        node = buffer.start + self.leaves
        while node:
            found.extend(self.nodes.get(node, ()))
            node >>= 1
        first = bisect.bisect_right(self.starts, (buffer.start, (float("inf"),)))
        last = bisect.bisect_left(self.starts, (buffer.end, ()))
        found.extend(span for _, span in self.starts[first:last])
        return found


def _lowest_gap(busy: List[tuple], size: int) -> int:
    candidate = 0
    for low, high in busy:
        if candidate + size <= low:
            return candidate
        candidate = max(candidate, high)
    return candidate


def arena_size(buffers: Sequence[Buffer], offsets: Dict[int, int]) -> int:
    return max((offsets[i] + b.size_bytes for i, b in enumerate(buffers)), default=0)
