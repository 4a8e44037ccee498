"""Pinned host memory for the swap: exactly the bytes asked for, and a plan's whole share pinned up front.

Why exact: PyTorch's pinned allocator (`torch.empty(..., pin_memory=True)`) rounds every block up to a power of two,
so a 2.5 GiB swap buffer pinned 4 GiB; the Llama-3-8B 320K plan on one H200 (21 layer inputs of 2.5 GiB in host
memory) held 86.1 GiB resident against 52.5 GiB of buffers. Here memory is allocated unpinned and page-locked as
it is (cudaHostRegister, through PyTorch's own helper), byte for byte.

Why up front: the pool pinned each buffer when the first forward first swapped into it, so step 1 paid for pinning
the whole share (76 GiB for the 256K plan: step 1 took 198.8 s against 150.9 s for step 2). `HostSlab` pins the
plan's share once, on a background thread started when the runtime is installed, so the pinning overlaps the
engine's and the data's start; buffers are views at aligned offsets, handed out in the order the first forward asks
for them and kept for the run; a buffer that does not fit what is left (a plan that under-counted) is pinned on its
own and counted.
"""

import threading
import weakref
from typing import Optional

import torch

ALIGNMENT = 512
"""Bytes between buffer starts: a multiple of every element size and of the DMA engines' preferred alignment."""


def host_empty(shape: tuple, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked byte for byte when `pin` (no power-of-two rounding)."""
    tensor = torch.empty(shape, dtype=dtype)
    if pin and tensor.numel():
        from torch.cuda._pin_memory_utils import pin_memory

        pin_memory(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        weakref.finalize(tensor, _unpin, tensor.untyped_storage())
    return tensor


def _unpin(storage) -> None:
    """Unlock the pages before the storage (held by this call until it returns) is freed."""
    from torch.cuda._pin_memory_utils import unpin_memory

    unpin_memory(storage.data_ptr())


class HostSlab:
    """`nbytes` of host memory (pinned when `pin`), allocated on a background thread started here."""

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = int(nbytes)
        self.pin = pin
        self.offset = 0
        self.fallback_bytes = 0
        """Bytes of buffers that did not fit and were allocated on their own."""
        self._storage: Optional[torch.Tensor] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._allocate, name="longtrain-host-slab", daemon=True)
        self._thread.start()

    def _allocate(self) -> None:
        try:
            self._storage = host_empty((self.nbytes,), torch.uint8, self.pin)
        except BaseException as error:  # noqa: BLE001 - re-raised in the thread that asks for a buffer
            self._error = error

    def ready(self) -> torch.Tensor:
        """The slab, waiting for its allocation if it is still running."""
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"could not allocate {self.nbytes / 2**30:.1f} GiB of "
                               f"{'pinned ' if self.pin else ''}host memory for the plan's swap: {self._error}") \
                from self._error
        return self._storage

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of this shape and dtype: a view into the slab, or, when the slab has no room left, a
        tensor of its own (pinned alike)."""
        storage = self.ready()
        need = int(torch.Size(shape).numel()) * dtype.itemsize
        start = -(-self.offset // ALIGNMENT) * ALIGNMENT
        if start + need > self.nbytes:
            self.fallback_bytes += need
            return host_empty(shape, dtype, self.pin)
        self.offset = start + need
        return storage[start:start + need].view(dtype).view(shape)
