"""Where a step's device time goes, from a torch.profiler Chrome trace: are the host copies hidden under compute?

Why: a swap plan is only as fast as its overlap. The profiler's operator table shows how long the copies took, not
whether the compute stream waited for them; this reads the device timeline instead: kernel busy time (union over
streams), copy time per direction, the share of copy time that ran while some kernel was running, device idle
time, and the host-side calls that stall the CPU (synchronisations, cudaMalloc/cudaFree from allocator retries).
"""

import json
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

Interval = Tuple[float, float]

STALL_CALLS = ("Synchronize", "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaHostRegister")


def union(intervals: Iterable[Interval]) -> List[Interval]:
    """Sorted, merged intervals."""
    merged: List[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered(interval: Interval, merged: List[Interval]) -> float:
    """Length of `interval` inside the merged intervals."""
    start, end = interval
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in merged if a < end and b > start)


def timeline_summary(events: List[Dict]) -> Dict[str, float]:
    """Seconds of: span, kernel busy, copies by direction, copy time overlapped by kernels, idle, host stalls."""
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
    device = kernels + [(e["ts"], e["ts"] + e["dur"]) for e in copies]
    if not device:
        return {}
    busy = union(kernels)
    span = max(end for _, end in device) - min(start for start, _ in device)
    summary = {"span_s": span, "kernel_busy_s": sum(b - a for a, b in busy), "d2h_s": 0.0, "h2d_s": 0.0,
               "d2d_s": 0.0, "copy_hidden_s": 0.0}
    for copy in copies:
        direction = _direction(copy["name"])
        summary[f"{direction}_s"] += copy["dur"]
        if direction != "d2d":
            summary["copy_hidden_s"] += covered((copy["ts"], copy["ts"] + copy["dur"]), busy)
    summary["idle_s"] = span - summary["kernel_busy_s"]
    for event in events:
        name = event.get("name", "")
        if event.get("cat") in ("cuda_runtime", "cuda_driver") and any(call in name for call in STALL_CALLS):
            summary[f"host_{name}_s"] = summary.get(f"host_{name}_s", 0.0) + event["dur"]
    return {key: value / 1e6 for key, value in summary.items()}  # the trace is in microseconds


def _direction(name: str) -> str:
    if "DtoH" in name:
        return "d2h"
    if "HtoD" in name:
        return "h2d"
    return "d2d"


def load_events(path: Path) -> List[Dict]:
    data = json.loads(Path(path).read_text())
    return [e for e in data.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def describe(summary: Dict[str, float]) -> str:
    """One paragraph for the bench output."""
    if not summary:
        return "timeline: no device events recorded"
    moved = summary["d2h_s"] + summary["h2d_s"]
    hidden = summary["copy_hidden_s"] / moved if moved else 1.0
    stalls = ", ".join(f"{key[5:-2]} {value:.3f} s" for key, value in summary.items()
                       if key.startswith("host_") and value > 0.0005)
    return (f"timeline: span {summary['span_s']:.3f} s, kernels busy {summary['kernel_busy_s']:.3f} s, device idle "
            f"{summary['idle_s']:.3f} s; host copies D2H {summary['d2h_s']:.3f} s + H2D {summary['h2d_s']:.3f} s, "
            f"{hidden:.0%} of it under kernels; device-to-device copies {summary['d2d_s']:.3f} s; host stalls: "
            f"{stalls or 'none'}")
