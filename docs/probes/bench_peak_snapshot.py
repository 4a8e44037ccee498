"""What is alive at a bench row's allocated peak: run `longtrain bench` under CUDA's memory history, then list the
blocks live at the peak of the last timed step by size (sizes name the tensors: at 256K tokens of a Llama-7B layer a
norm output or q is 2 GiB, an MLP intermediate 5.375 GiB), to set beside the planner's inventory of that moment.

    python3 docs/probes/bench_peak_snapshot.py record OUT.pickle.gz -- --layers 3 --seq-lens 262144 --modes longtrain
    python3 docs/probes/bench_peak_snapshot.py peak OUT.pickle.gz
    python3 docs/probes/bench_peak_snapshot.py segments OUT.pickle.gz

    python3 docs/probes/bench_peak_snapshot.py growth OUT.pickle.gz

`segments` lists, at the reserved peak of the last timed step, every segment with the bytes its live blocks use and
its largest free gap: whether the spare (reserved - allocated) is whole cached segments or holes in used ones.
`growth` follows the step the bench runs from an emptied cache (between the trace's last two bursts of segment
frees) and lists each segment it reserves, with the request it serves and what the cached segments had free then:
a segment reserved while more than its size is free elsewhere is fragmentation.
"""

import collections
import gzip
import os
import pickle
import sys

GIB = 2**30


def record(path: str, bench_args) -> None:
    import torch
    from launch.cli import main

    stacks = os.environ.get("SNAPSHOT_STACKS") == "1"  # Python stacks of each allocation (slower, larger)
    torch.cuda.memory._record_memory_history(context="alloc" if stacks else None, stacks="python" if stacks else "all",
                                             max_entries=2_000_000)
    try:
        main(["bench", *bench_args])
    finally:
        with gzip.open(path, "wb") as handle:
            pickle.dump(torch.cuda.memory._snapshot(), handle)
        torch.cuda.memory._record_memory_history(enabled=None)


def peak(path: str) -> None:
    with gzip.open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    trace = max(snapshot["device_traces"], key=len)
    live, allocated, curve = {}, 0, []
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], index)
            allocated += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            allocated -= live.pop(event["addr"])[0]
        curve.append(allocated)
    start = int(len(trace) * 2 / 3)  # the last timed step (the trace ends with the row's timed steps)
    at = max(range(start, len(trace)), key=curve.__getitem__)
    alive = {}
    for index, event in enumerate(trace[: at + 1]):
        if event["action"] == "alloc":
            alive[event["addr"]] = (event["size"], index)
        elif event["action"] == "free_requested":
            alive.pop(event["addr"], None)
    by_size = collections.Counter(size for size, _ in alive.values())
    print(f"{len(trace)} events; peak of the last third at event {at}: {curve[at] / GIB:.2f} GiB allocated "
          f"(global peak {max(curve) / GIB:.2f})")
    print("live blocks at that peak: size GiB x count = GiB (largest first; blocks under 64 MiB summed)")
    small = 0
    for size, count in sorted(by_size.items(), reverse=True):
        if size < 64 * 2**20:
            small += size * count
            continue
        print(f"  {size / GIB:8.3f} x {count:3d} = {size * count / GIB:8.2f}")
    print(f"  small blocks: {small / GIB:.2f}")
    print("the 12 latest allocations before the peak (size GiB, events before it):")
    for size, index in sorted(alive.values(), key=lambda v: -v[1])[:12]:
        print(f"  {size / GIB:.3f} GiB, {at - index} events before")


def _apply(event, mapped: dict, blocks: dict) -> tuple:
    """Segments and occupied blocks after one trace event (a block counts until its free has completed): the change
    of (reserved, allocated) bytes."""
    action, addr, size = event["action"], event["addr"], event["size"]
    if action in ("segment_alloc", "segment_map"):
        mapped[addr] = size
        return size, 0
    if action in ("segment_free", "segment_unmap"):
        return -mapped.pop(addr, 0), 0
    if action == "alloc":
        blocks[addr] = size
        return 0, size
    if action == "free_completed":
        return 0, -blocks.pop(addr, 0)
    return 0, 0


def segments(path: str) -> None:
    with gzip.open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    trace = max(snapshot["device_traces"], key=len)
    reserved = allocated = 0
    curve = []
    mapped, blocks = {}, {}
    for event in trace:
        more_reserved, more_allocated = _apply(event, mapped, blocks)
        reserved, allocated = reserved + more_reserved, allocated + more_allocated
        curve.append((reserved, allocated))
    start = int(len(trace) * 2 / 3)
    at = max(range(start, len(trace)), key=lambda i: curve[i][0])
    mapped, blocks = {}, {}
    for event in trace[: at + 1]:
        _apply(event, mapped, blocks)
    reserved, allocated = curve[at]
    print(f"reserved peak of the last third at event {at}: {reserved / GIB:.2f} GiB reserved, "
          f"{allocated / GIB:.2f} allocated (occupied blocks), spare {(reserved - allocated) / GIB:.2f}")
    print("segment GiB: used GiB in blocks, free GiB, largest free gap GiB")
    whole_free = 0
    for base, size in sorted(mapped.items(), key=lambda kv: -kv[1]):
        gaps = _free_gaps(base, size, blocks)
        used = size - sum(gaps)
        if used == 0:
            whole_free += size
        if size >= 256 * 2**20 or used == 0:
            print(f"  {size / GIB:8.3f}: used {used / GIB:8.3f}, free {(size - used) / GIB:7.3f}, "
                  f"largest gap {max(gaps) / GIB:7.3f}")
    print(f"whole free segments: {whole_free / GIB:.2f} GiB")


def _free_gaps(base: int, size: int, blocks: dict) -> list:
    """The free stretches of one segment between its occupied blocks."""
    gaps, cursor = [], base
    for address, length in sorted((a, n) for a, n in blocks.items() if base <= a < base + size):
        gaps.append(address - cursor)
        cursor = max(cursor, address + length)
    return gaps + [base + size - cursor]


def growth(path: str) -> None:
    with gzip.open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    trace = max(snapshot["device_traces"], key=len)
    bursts = []  # [first, last] event of each run of segment frees (torch.cuda.empty_cache)
    for index, event in enumerate(trace):
        if event["action"] == "segment_free":
            if bursts and index - bursts[-1][1] <= 2:
                bursts[-1][1] = index
            else:
                bursts.append([index, index])
    emptied = [b for b in bursts if b[1] > b[0]]
    if len(emptied) < 2:
        print("no step from an emptied cache in this trace (the bench runs one only for a row over 2%)")
        return
    start, end = emptied[-2][1] + 1, emptied[-1][0]
    mapped, blocks, allocated = {}, {}, 0
    for event in trace[:start]:
        allocated += _apply(event, mapped, blocks)[1]
    print(f"the step from an emptied cache: events {start}-{end}")
    print("new segment GiB (request GiB): free in cached segments GiB, their largest gap GiB, allocated GiB")
    for index in range(start, end):
        event = trace[index]
        if event["action"] == "segment_alloc":
            gaps = [g for base, size in mapped.items() for g in _free_gaps(base, size, blocks)]
            request = next((e["size"] for e in trace[index + 1:end] if e["action"] == "alloc"), 0)
            print(f"  {event['size'] / GIB:6.3f} ({request / GIB:6.3f}): {sum(gaps) / GIB:6.2f}, "
                  f"{max(gaps, default=0) / GIB:6.3f}, {allocated / GIB:6.2f}")
        allocated += _apply(event, mapped, blocks)[1]


if __name__ == "__main__":
    {"record": lambda: record(sys.argv[2], sys.argv[4:]), "peak": lambda: peak(sys.argv[2]),
     "segments": lambda: segments(sys.argv[2]), "growth": lambda: growth(sys.argv[2])}[sys.argv[1]]()
