"""The static arena: the plan's long-lived activation buffers as views of one preallocated device buffer.

Why: at long context the caching allocator fragments (on the H100 at 128K a planned run peaked at 58 GiB
allocated but 75 GiB reserved): each layer's kept activations live from its forward to its backward, in between
tensors of other sizes come and go, and a freed hole rarely fits the next request. The planner lays these
buffers out offline (`runtime_arena` in the plan file); the runtime copies each layer's kept share into its
region instead of asking the allocator, so they can never fragment it.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from orchestrator.memory.tokenwise import runtime_of
from spec.plan import align

log = logging.getLogger("longtrain.memory")


@dataclass
class Config:
    """The plan's `runtime_arena` (its size and each layer's region) and the device it lives on (None: this
    worker's CUDA device, else the CPU)."""

    runtime_arena: Dict[str, Any] = field(default_factory=dict)
    device: Optional[torch.device] = None


def apply(model, config: Config, layers: Iterable[int]) -> Optional["KeptArena"]:
    """Place the kept slices of these split layers in the arena's planned regions: it goes to the token-wise
    runtime of the model (`tokenwise.apply` first). The arena, or None when there is none or no layer is split."""
    runtime = runtime_of(model)
    chosen = set(layers)
    if not config.runtime_arena or runtime is None or not chosen & set(runtime.layers):
        return None
    device = config.device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                               else torch.device("cpu"))
    arena = KeptArena(config.runtime_arena, device, chosen)
    runtime.arena = arena
    return arena


class KeptArena:
    """Each layer's region holds its kept token-wise slices, roles in inventory order, each aligned."""

    def __init__(self, runtime_arena: Dict, device: torch.device, layers: Optional[set] = None):
        self.buffer = torch.empty(int(runtime_arena["arena_bytes"]), dtype=torch.uint8, device=device)
        self.regions = {b["layer"]: (b["offset_bytes"], b["size_bytes"]) for b in runtime_arena["buffers"]
                        if layers is None or b["layer"] in layers}
        self.fallbacks = 0
        """Slice sets that did not fit their region (then the allocator is used; a plan/runtime mismatch)."""
        self.fallback_bytes = 0
        """What those slice sets asked of the caching allocator instead."""
        self.fallen_back: set = set()
        self._reported = (0, 0)

    def views(self, layer: int, slices: List[Tuple[str, tuple, torch.dtype]]) -> Optional[Dict[str, torch.Tensor]]:
        """Contiguous tensors for the layer's kept slices (role, shape, dtype), or None if the plan has no room."""
        if layer not in self.regions:
            return None
        offset, size = self.regions[layer]
        cursor, out = offset, {}
        for role, shape, dtype in slices:
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = itemsize * int(torch.Size(shape).numel())
            if cursor + nbytes > offset + size:
                self._fall_back(layer, cursor + nbytes - offset, size)
                return None
            out[role] = self.buffer[cursor:cursor + nbytes].view(dtype).view(shape)
            cursor += align(nbytes)
        return out

    def step_fallbacks(self) -> Tuple[int, int]:
        """(slice sets, bytes) that fell back to the caching allocator since the last call: a step's, for its
        step line (the goal is none)."""
        now = (self.fallbacks, self.fallback_bytes)
        since, self._reported = (now[0] - self._reported[0], now[1] - self._reported[1]), now
        return since

    def _fall_back(self, layer: int, needed: int, size: int) -> None:
        """Count a slice set that does not fit; say so once per layer (the run degrades, it does not fail)."""
        self.fallbacks += 1
        self.fallback_bytes += needed
        if layer not in self.fallen_back:
            self.fallen_back.add(layer)
            log.warning("arena: layer %d needs %d bytes, its planned region has %d: its kept slices use the "
                        "caching allocator (the plan does not match this run; re-plan)", layer, needed, size)

    @property
    def bytes(self) -> int:
        return self.buffer.numel()
