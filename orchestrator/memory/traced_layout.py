"""MEMO's layout of a traced step: every transient request of one training step at an offset in one buffer.

Why: the static layout (`planner.schedule`) covers what the planner schedules analytically; autograd's gradients,
restored tensors and the forward's transients are only known by running a step. A step asks for the same sizes in
the same order every time, so one traced step (recorded by `replay_allocator`) is laid out here with the same best
fit as the plan's arena (`spec.placement`), and later steps are served at these offsets by request number.

The trace: one row per event in host order, (kind, request, size, stream): kind `MALLOC` or `FREE`; request, the
allocation's number in the step window (from 0; -1 for a free of a block allocated before the window); size in
bytes; the stream handle it was allocated on. The row's index is its time.
"""

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from spec.placement import Buffer, PlaceInOrder, arena_size, best_fit, lower_bound
from spec.plan import align
from spec.units import GIB

MALLOC, FREE = 1, 2
"""A trace row's kinds (the numbers `replay_allocator.cpp` writes)."""
PLANNED_MIN_BYTES = 1 << 20
"""Requests below this go to the runtime's exact-size cache: there are many of them, their bytes are few, and leaving
them out keeps the layout problem small."""


@dataclass
class TracedLayout:
    """Where each traced request goes: offsets (-1: the exact-size cache) by request number."""

    sizes: np.ndarray
    offsets: np.ndarray
    streams: np.ndarray
    arena_bytes: int
    lower_bound_bytes: int
    """The most planned bytes live at once in the traced step: no layout can be smaller."""
    planned: int
    requests: int

    def describe(self) -> str:
        return (f"replayed layout {self.arena_bytes / GIB:.1f} GiB for {self.planned} of {self.requests} requests "
                f"(lower bound {self.lower_bound_bytes / GIB:.1f} GiB)")


def plan_layout(events: np.ndarray, min_bytes: int = PLANNED_MIN_BYTES,
                place: Optional[PlaceInOrder] = None) -> TracedLayout:
    """Offsets for a traced step's requests (rows as above); `place`: the best fit's placer (default the Python
    reference; the replay allocator passes its C++ one, which gives the same offsets faster).

    Planned: requests on the step's main stream (the one most requests use), at least `min_bytes`, freed within
    the step (a tensor that outlives the step would hold its bytes when the next step's same request comes)."""
    mallocs = events[events[:, 0] == MALLOC]
    requests = int(mallocs[:, 1].max()) + 1 if len(mallocs) else 0
    sizes = np.full(requests, -1, dtype=np.int64)
    streams = np.zeros(requests, dtype=np.int64)
    starts = np.full(requests, -1, dtype=np.int64)
    ends = np.full(requests, -1, dtype=np.int64)
    for time, (kind, request, size, stream) in enumerate(events.tolist()):
        if request < 0:
            continue
        if kind == MALLOC:
            sizes[request], streams[request], starts[request] = size, stream, time
        elif starts[request] >= 0:
            ends[request] = time
    main_stream = Counter(streams[sizes > 0].tolist()).most_common(1)[0][0] if requests else 0
    chosen = [r for r in range(requests)
              if sizes[r] >= min_bytes and ends[r] >= 0 and streams[r] == main_stream]
    buffers = [Buffer(name=str(r), layer=0, size_bytes=align(int(sizes[r])), start=int(starts[r]), end=int(ends[r]))
               for r in chosen]
    offsets = np.full(requests, -1, dtype=np.int64)
    placed = best_fit(buffers, place)
    for index, request in enumerate(chosen):
        offsets[request] = placed[index]
    return TracedLayout(sizes=sizes, offsets=offsets, streams=streams, arena_bytes=arena_size(buffers, placed),
                        lower_bound_bytes=lower_bound(buffers), planned=len(chosen), requests=requests)
