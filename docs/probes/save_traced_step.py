"""Save the trace of a bench row's step under the planned allocator (`traced_layout`'s rows, .npy), to lay it out
again elsewhere (`docs/probes/traced_layout_time.py --trace FILE`); one row per call (a later row overwrites):

    python3 docs/probes/save_traced_step.py trace.npy --layers 4 --seq-lens 262144 --modes longtrain \\
        --repeats 1 --elementwise compiled --allocator planned
"""

import sys

import numpy as np

from launch.cli import main
from orchestrator.memory import replay_allocator

if __name__ == "__main__":
    out, traced = sys.argv[1], replay_allocator.ReplayAllocator.traced

    def traced_and_saved(self, step):
        events = traced(self, step)
        np.save(out, events)
        return events

    replay_allocator.ReplayAllocator.traced = traced_and_saved
    sys.exit(main(["bench", *sys.argv[2:]]))
