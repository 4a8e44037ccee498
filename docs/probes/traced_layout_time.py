"""How long the traced layout takes against the size of the step: synthetic layered steps
(`tests/test_replay_allocator.py::layered_step_events`, 180 requests a layer) laid out by the library's C++ best
fit and, up to --python-up-to layers, by the Python reference (`spec.placement.place_in_order`), same offsets.

    PYTHONPATH=. python3 docs/probes/traced_layout_time.py --layers 8,16,32,64,128 --python-up-to 32
    PYTHONPATH=. python3 docs/probes/traced_layout_time.py --trace trace.npy   # a real step's (save_traced_step.py)
"""

import argparse
import time

import numpy as np

from orchestrator.memory import replay_allocator
from orchestrator.memory.traced_layout import plan_layout
from tests.test_replay_allocator import layered_step_events


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="8,16,32,64")
    parser.add_argument("--python-up-to", type=int, default=16)
    parser.add_argument("--trace", help="a saved trace (.npy) instead of the synthetic steps")
    args = parser.parse_args()
    allocator = replay_allocator.ReplayAllocator(replay_allocator.load_library())
    print("layers  requests  planned  C++ s  Python s  arena / lower bound")
    steps = ([(0, np.load(args.trace))] if args.trace else
             [(layers, layered_step_events(layers, seed=0)) for layers in map(int, args.layers.split(","))])
    for layers, events in steps:
        started = time.perf_counter()
        native = plan_layout(events, place=allocator.place_in_order)
        native_seconds = time.perf_counter() - started
        python = "-"
        if args.trace or layers <= args.python_up_to:
            started = time.perf_counter()
            reference = plan_layout(events)
            python = f"{time.perf_counter() - started:.1f}"
            assert np.array_equal(reference.offsets, native.offsets)
        print(f"{layers:6d}  {native.requests:8d}  {native.planned:7d}  {native_seconds:5.1f}  {python:>8}  "
              f"{native.arena_bytes / native.lower_bound_bytes:.3f}")


if __name__ == "__main__":
    main()
