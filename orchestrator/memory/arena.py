"""The static arena: the plan's long-lived activation buffers as views of one preallocated device buffer.

Why: at long context the caching allocator fragments (on the H100 at 128K a planned run peaked at 58 GiB
allocated but 75 GiB reserved): each layer's kept activations live from its forward to its backward, in between
tensors of other sizes come and go, and a freed hole rarely fits the next request. The planner lays these
buffers out offline (`runtime_arena` in the plan file); the runtime copies each layer's kept share into its
region instead of asking the allocator, so they can never fragment it.
"""

from typing import Dict, List, Optional, Tuple

import torch

from spec.plan import align


class KeptArena:
    """Each layer's region holds its kept token-wise slices, roles in inventory order, each aligned."""

    def __init__(self, runtime_arena: Dict, device: torch.device):
        self.buffer = torch.empty(int(runtime_arena["arena_bytes"]), dtype=torch.uint8, device=device)
        self.regions = {b["layer"]: (b["offset_bytes"], b["size_bytes"]) for b in runtime_arena["buffers"]}
        self.fallbacks = 0
        """Layers whose slices did not fit their region (then the allocator is used; a plan/runtime mismatch)."""

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
                self.fallbacks += 1
                return None
            out[role] = self.buffer[cursor:cursor + nbytes].view(dtype).view(shape)
            cursor += align(nbytes)
        return out

    @property
    def bytes(self) -> int:
        return self.buffer.numel()
