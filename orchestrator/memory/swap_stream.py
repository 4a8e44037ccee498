"""The host side of MEMO's swap (`tokenwise`): reused host buffers, the CUDA copy streams (one each way) that copy
swapped slices out during forward and back one layer ahead during backward, and the throttle that keeps the host a
bounded number of layers ahead of the device. Without CUDA every copy is a plain copy, so the same code path runs in
CI.
"""

from collections import deque
from typing import Deque, Dict, Iterable, Optional, Tuple

import torch

from orchestrator.memory import replay_allocator
from orchestrator.memory.host_slab import HostSlab, host_empty


class HostPool:
    """Host buffers for swapped slices, allocated once per (layer, role, shape) and reused every step; pinned
    (byte for byte, `host_slab`) on a CUDA machine so copies are asynchronous; carved from `slab` when the plan's
    share was pinned up front."""

    def __init__(self, slab: Optional[HostSlab] = None):
        self.buffers: Dict[tuple, torch.Tensor] = {}
        self.slab = slab

    def buffer(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        full_key = (*key, tuple(like.shape), like.dtype)
        if full_key not in self.buffers:
            if self.slab is not None:
                self.buffers[full_key] = self.slab.take(tuple(like.shape), like.dtype)
            else:
                self.buffers[full_key] = host_empty(tuple(like.shape), like.dtype, pin=like.is_cuda)
        return self.buffers[full_key]

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def dense_flat(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of the tensor's memory in memory order, when it covers one dense block (None otherwise).

    Why: a token slice of a head-major tensor ([B, H, S, D] stored as [B, S, H, D]) is one dense block but not
    "contiguous" in its logical order, and copying it to a contiguous host buffer takes PyTorch's element-wise
    cross-device path: 1.8 GB/s instead of 50 GB/s on an H200, with host synchronisations that serialise
    the copy with compute. Copied as flat bytes it is one DMA each way."""
    dims = sorted((d for d in range(tensor.dim()) if tensor.shape[d] != 1), key=lambda d: -tensor.stride(d))
    expected = 1
    for d in reversed(dims):
        if tensor.stride(d) != expected:
            return None
        expected *= tensor.shape[d]
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


class SwapStream:
    """The two copy streams of one model's swaps (made on the first copy out, on GPU) and its throttle.

    Why two: PCIe moves data both ways at once (on an H100 55 GB/s each way alone, 93 GB/s together), and the copy
    engines take each direction separately, but work queued on one stream runs in order: with one stream the last
    layers' copies out and the first layers' prefetches of a backward waited for each other. Each direction has its
    own stream now, ordered per host buffer by events: a prefetch waits for the copy out of the same buffer, and a
    copy out waits for the prefetch still reading the buffer it overwrites (the next step's), nothing else."""

    def __init__(self, max_layers_ahead: int):
        self.out_stream = None
        """Device -> host (forward's swaps)."""
        self.in_stream = None
        """Host -> device (backward's prefetches)."""
        self.max_layers_ahead = max_layers_ahead
        self.in_flight: Deque[object] = deque()
        """Device events of the latest layers' copies (forward) or backward starts: the host waits for the oldest
        beyond `max_layers_ahead`, so it never queues more than that many layers ahead of the device."""
        self.last_copy: Dict[int, object] = {}
        """Host buffer address -> the event of its latest copy, either way."""
        self.sources: Deque[Tuple[int, torch.Tensor, object, int]] = deque()
        """Device tensors being copied out, with their layer's forward serial, the event where their copy ends and
        their host buffer's address: held until it has ended (or taken back, `take_held`)."""
        self.forward_serial = 0
        """Layer forwards started so far (over the run)."""

    def _streams(self) -> bool:
        if self.out_stream is None and torch.cuda.is_available():
            self.out_stream, self.in_stream = torch.cuda.Stream(), torch.cuda.Stream()
        return self.out_stream is not None

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Device -> host on the out stream (the compute stream does not wait); a plain copy on CPU.

        The source is held here until its copy has ended (`release_copied`; at the latest when the forward after
        next starts, `forward_starts`), not handed to `record_stream`: a block freed under `record_stream` returns
        to the caching allocator only once every copy queued on the out stream by then has ended, and the host runs
        layers ahead of the device, so at 256K tokens whole MLP intermediates (5.4 GiB each) waited up to 2.8 s,
        unseen by the allocated-memory statistics, and reserved memory reached 136 GiB against 62 allocated. A
        source that is a slice of a larger block is first copied to a block of its own (a device copy, ~1000x
        faster than PCIe), so the larger block is freed at once."""
        if not src.is_cuda or not self._streams():
            dst.copy_(src)
            return
        self.release_copied()
        if src.untyped_storage().nbytes() > src.numel() * src.element_size():
            src = src.clone()
        stream = self.out_stream
        stream.wait_stream(torch.cuda.current_stream())
        previous = self.last_copy.get(dst.data_ptr())
        if previous is not None:
            stream.wait_event(previous)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        self.last_copy[dst.data_ptr()] = copied
        self.sources.append((self.forward_serial, src, copied, dst.data_ptr()))

    def release_copied(self) -> None:
        """Drop the sources whose copy out has ended (the out stream copies in order): their blocks are free for
        any stream now, and counted as allocated until then.

        Not under the replay allocator (train.allocator=planned): there every step must free its blocks at the same
        points as the traced step whose layout it replays, and whether a copy has ended by now depends on timing
        (on a lent H200 one such source freed later than traced took a planned slot still held: a fallback). Its
        sources are released where the plan lays them out instead (`forward_starts`)."""
        if replay_allocator.installed() is not None:
            return
        while self.sources and self.sources[0][2].query():
            self.sources.popleft()

    def forward_starts(self) -> None:
        """A layer's forward starts: the sources of the layer before the previous one are released, the compute
        stream first waiting for their copies. So a layer's swapped bytes live through the next layer's forward and
        no longer, as the plan lays them out (`planner.schedule`: `swap_out_staging`); the wait costs nothing when
        the copy hid behind that forward, which the plan's overlap model requires."""
        self.forward_serial += 1
        self._settle(self.forward_serial - 2)

    def _settle(self, last_serial: int) -> None:
        """Release the sources of forwards up to `last_serial`, after the compute stream waits for their copies
        (the compute stream's later work may then reuse their blocks)."""
        while self.sources and self.sources[0][0] <= last_serial:
            _, _, copied, _ = self.sources.popleft()
            torch.cuda.current_stream().wait_event(copied)

    def take_held(self, host_addresses: Iterable[int]) -> Dict[int, torch.Tensor]:
        """The device sources still held for the host buffers at these addresses (address -> source), no longer held
        here.

        Why: the last layer of a forward is fetched when its own backward starts, right after the LM head, and its
        copies out have often not ended by then (nothing computes between them but the head: MEMO's rule). Its
        backward reads the sources still on the device instead of waiting for their copy out and bringing the same
        bytes back: what remains of its round trip is the fetch of what the head did hide. Memory is unchanged
        (the sources were held until their copy ended; a prefetch target would take their place). The copy out of a
        taken source may still be reading it when its block is reused: that host buffer then holds torn bytes,
        never read (this step fetches nothing from it; the next copy out into it waits for this one)."""
        wanted = set(host_addresses)
        taken, held = {}, deque()
        for entry in self.sources:
            if entry[3] in wanted:
                taken[entry[3]] = entry[1]
            else:
                held.append(entry)
        self.sources = held
        return taken

    def forward_done(self) -> None:
        """Throttle the host on an event where a layer's copies out end (GPU only)."""
        if self.out_stream is not None:
            copied_out = torch.cuda.Event()
            copied_out.record(self.out_stream)
            self.throttle(copied_out)

    def backward_started(self) -> None:
        """Throttle the host on an event where a layer's backward starts on the compute stream (GPU only)."""
        if self.out_stream is not None:
            self._settle(self.forward_serial)  # every copy out has ended before a backward reuses its blocks
            started = torch.cuda.Event()
            started.record(torch.cuda.current_stream())
            self.throttle(started)

    def throttle(self, event) -> None:
        """Let the host run at most `max_layers_ahead` layers ahead of the device.

        Why: the host queues a whole step in milliseconds. A buffer freed while a copy still reads it cannot be
        reused before the copy ends, so without a bound the caching allocator reserves new memory for every
        layer's slices (reserved grew to 3x allocated at 64K tokens) until it must free its cache, which
        synchronises the device; and prefetches queued for every layer at once all compete for the copy
        engine with the one the device is waiting for."""
        self.in_flight.append(event)
        while len(self.in_flight) > self.max_layers_ahead:
            self.in_flight.popleft().synchronize()
        self.release_copied()

    def prefetch(self, hosts: Dict[str, Tuple[torch.Tensor, torch.device]]):
        """Start the host -> device copies of a layer's swapped slices (role: (host buffer, device)) on the in
        stream: (the device tensors, the event that marks them ready), or None without copy streams.

        The destinations come from the compute stream's pool (blocks of a side-stream pool would never serve the
        compute stream: reserved memory doubles), and the copies start only once the compute stream reaches this
        point (after every earlier use of those blocks, and after the backward of the layer above has started, so
        a prefetch never competes with the copies the device is waiting for) and once each buffer's copy out has
        ended (on the out stream, which may still be copying later layers out)."""
        stream = self.in_stream
        if stream is None:
            return None
        targets = {role: torch.empty(host.shape, dtype=host.dtype, device=device)
                   for role, (host, device) in hosts.items()}
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            for host, _ in hosts.values():
                copied = self.last_copy.get(host.data_ptr())
                if copied is not None:
                    stream.wait_event(copied)
            for role, (host, _) in hosts.items():
                targets[role].copy_(host, non_blocking=True)
            fetched = torch.cuda.Event()
            fetched.record(stream)
        for host, _ in hosts.values():
            self.last_copy[host.data_ptr()] = fetched
        return targets, fetched

    @staticmethod
    def wait(event) -> None:
        """The compute stream waits for prefetched slices (their blocks are the compute stream's own)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
