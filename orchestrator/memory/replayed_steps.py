"""`train.allocator=planned` in the training loop: a run's first step warms up, its second is traced and laid out,
every later step is served at the traced offsets.

Why the second step: the first allocates what lives across steps (the optimizer's states, DeepSpeed's buffers,
compiled kernels), which a trace of it would record as requests that never die. A resumed run starts over: its
first step warms up again. Between steps (evaluation, checkpoints) requests come from the allocator's exact-size
cache, next to the layout's buffer.
"""

import logging
import time
from typing import Callable, Optional, Tuple, TypeVar

from orchestrator.memory.replay_allocator import ReplayAllocator

logger = logging.getLogger("longtrain")
Result = TypeVar("Result")


class ReplayedSteps:
    """Runs each step of a run under the replay allocator (or as it is without one)."""

    def __init__(self, replay: Optional[ReplayAllocator], first_step: int):
        self.replay = replay
        self.trace_step = first_step + 1
        self._seen = replay.counters() if replay is not None else None
        self.layout_bytes = 0
        """The traced layout's buffer if the last step ran at its offsets, else 0."""

    def run(self, step: int, work: Callable[[], Result]) -> Result:
        if self.replay is None or step < self.trace_step:
            return work()
        if step == self.trace_step:
            results = []
            started = time.perf_counter()
            layout = self.replay.lay_out(lambda: results.append(work()))
            logger.info("step %d traced and laid out in %.1f s: %s", step, time.perf_counter() - started,
                        layout.describe())
            return results[0]
        if step == self.trace_step + 1:
            self.replay.reset_peaks()  # from here on the peaks are the layout's, not the warm-up's exact-size cache
        with self.replay.window():
            result = work()
        self.layout_bytes = self.replay.layout.arena_bytes
        return result

    def step_fallbacks(self) -> Tuple[int, int]:
        """(requests, bytes) the layout covers that missed their offsets since the last call (the goal is none);
        (0, 0) without the replay allocator."""
        if self.replay is None:
            return 0, 0
        now, before = self.replay.counters(), self._seen
        self._seen = now
        return now.fallbacks - before.fallbacks, now.fallback_bytes - before.fallback_bytes
