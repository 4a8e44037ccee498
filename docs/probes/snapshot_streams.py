"""Where a run's reserved-but-unallocated GPU memory sits, from a `metrics.memory_snapshot_steps` snapshot:
reserved and allocated bytes per CUDA stream at the snapshot; over the trace, the allocated statistic against the
memory blocks actually occupy (a block freed under `record_stream` leaves the statistic at once but returns to the
allocator only when the other stream has passed), and those deferred frees by block size and delay.

    python3 docs/probes/snapshot_streams.py RUN_DIR/memory_snapshot_rank0.pickle
"""

import collections
import gzip
import pickle
import sys

GIB = 2**30


def at_snapshot(snapshot) -> None:
    per_stream = collections.defaultdict(collections.Counter)
    for segment in snapshot["segments"]:
        row = per_stream[segment["stream"]]
        row["segments"] += 1
        row["reserved"] += segment["total_size"]
        for block in segment["blocks"]:
            row[block["state"]] += block["size"]
            if block["state"] == "inactive":
                row["largest_hole"] = max(row["largest_hole"], block["size"])
    print("at the snapshot (GiB): stream | segments | reserved | allocated | pending free | inactive | largest hole")
    for stream, row in sorted(per_stream.items(), key=lambda kv: -kv[1]["reserved"]):
        print(f"  {stream:#x} | {row['segments']} | {row['reserved'] / GIB:.2f} | {row['active_allocated'] / GIB:.2f} | "
              f"{row['active_pending_free'] / GIB:.2f} | {row['inactive'] / GIB:.2f} | {row['largest_hole'] / GIB:.2f}")


def over_the_trace(trace) -> None:
    """Bytes are relative to the trace's start (the model's weights and earlier blocks are not in it)."""
    allocated = occupied = reserved = 0
    peak_allocated = peak_occupied = peak_reserved = 0
    requested = {}
    deferred = collections.defaultdict(list)
    for index, event in enumerate(trace):
        action, size = event["action"], event["size"]
        if action == "alloc":
            allocated += size
            occupied += size
        elif action == "free_requested":
            allocated -= size
            requested[event["addr"]] = (index, event["time_us"])
        elif action == "free_completed":
            occupied -= size
            asked = requested.pop(event["addr"], None)
            if asked is not None and index - asked[0] > 1:  # something happened in between: the free waited
                deferred[size].append((event["time_us"] - asked[1]) / 1e6)
        elif action in ("segment_alloc", "segment_map"):
            reserved += size
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size
        peak_allocated = max(peak_allocated, allocated)
        peak_occupied = max(peak_occupied, occupied)
        peak_reserved = max(peak_reserved, reserved)
    print(f"over the trace (GiB): allocated statistic peak {peak_allocated / GIB:.2f}, occupied by blocks peak "
          f"{peak_occupied / GIB:.2f}, reserved peak {peak_reserved / GIB:.2f}")
    print("deferred frees: block GiB | count | delay s (median, max)")
    for size in sorted(deferred, reverse=True)[:12]:
        delays = sorted(deferred[size])
        print(f"  {size / GIB:.3f} | {len(delays)} | {delays[len(delays) // 2]:.2f}, {delays[-1]:.2f}")
    if not deferred:
        print("  none")


def main(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        snapshot = pickle.load(handle)
    at_snapshot(snapshot)
    for trace in snapshot["device_traces"]:
        if trace:
            over_the_trace(trace)


if __name__ == "__main__":
    main(sys.argv[1])
