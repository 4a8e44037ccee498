"""The replay allocator on a GPU: a token-wise plan that keeps, swaps to host and recomputes gives the gradients it
gives under PyTorch's caching allocator, every planned request at its offset and reserved memory near the allocated
peak. Each allocator runs in a process of its own (the pluggable allocator must be chosen before CUDA
memory is first used).

Not bitwise: the reference does not repeat itself bitwise (two runs under the caching allocator differed by 0.25
on gradients of magnitude 92, one bf16 rounding step, on a lent H200 with deterministic algorithms requested), so
the check is the runs' difference against that step."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

STEPS = """
import json, sys, torch
allocator, out = sys.argv[1], sys.argv[2]
torch.use_deterministic_algorithms(True, warn_only=True)  # the comparison is bitwise: no atomics' order
replay = None
if allocator == "planned":
    from orchestrator.memory import replay_allocator
    replay = replay_allocator.install()
from launch.measure.bench import LayerStack
from launch.measure.calibration import bench_job
from orchestrator.memory import tokenwise
from orchestrator.model import rope_tables
from spec.plan import LayerPlan

job = bench_job(2, 8192, "llama-7b", [])
torch.manual_seed(0)
stack = LayerStack(job).cuda().to(torch.bfloat16)
tokenwise.apply(stack, tokenwise.Config(), [LayerPlan(layer=i, keep_fraction=0.25, swap_fraction=0.5,
                                                      recompute_fraction=0.25, offload_skeletal=i == 0)
                                            for i in range(2)])
x = torch.randn(1, 8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
cos, sin = rope_tables(torch.arange(8192, device="cuda"), 128, 1e4, torch.bfloat16)
grad = torch.randn_like(x)

grads = []

def step():  # like the bench's step: the gradients are read and freed inside it, so the layout covers them
    h = x
    for layer in stack.layers:
        h = layer(h, cos, sin)
    h.backward(grad)
    grads[:] = [g.cpu() for g in [x.grad] + [p.grad for p in stack.parameters()]]
    x.grad = None
    for p in stack.parameters():
        p.grad = None
    torch.cuda.synchronize()

step()
counters = {}
if replay is not None:
    from orchestrator.memory.traced_layout import plan_layout
    layout = plan_layout(replay.traced(step))
    replay.use(layout)
    replay.reset_peaks()
    with replay.window():
        step()
    c = replay.counters()
    counters = dict(planned=layout.planned, fallbacks=c.fallbacks, arena=c.arena, lower_bound=layout.lower_bound_bytes,
                    peak_allocated=c.peak_allocated, peak_reserved=c.peak_reserved)
else:
    step()
torch.save(grads, out + ".pt")
json.dump(counters, open(out + ".json", "w"))
"""


def _run(allocator: str, out: str) -> None:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    done = subprocess.run([sys.executable, "-c", STEPS, allocator, out], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_planned_replay_gives_the_caching_allocators_gradients(tmp_path):
    _run("caching", str(tmp_path / "caching"))
    _run("planned", str(tmp_path / "planned"))
    expected, got = torch.load(tmp_path / "caching.pt"), torch.load(tmp_path / "planned.pt")
    assert len(expected) == len(got) == 19
    for a, b in zip(expected, got):  # within a few bf16 rounding steps of the gradient's magnitude
        assert (a.float() - b.float()).abs().max() <= 1e-2 * a.float().abs().max()
    counters = json.loads((tmp_path / "planned.json").read_text())
    assert counters["planned"] > 50 and counters["fallbacks"] == 0
    assert counters["arena"] == counters["lower_bound"] or counters["arena"] <= 1.05 * counters["lower_bound"]
    spare = counters["peak_reserved"] - counters["peak_allocated"]
    # 3.4% at this small shape on a lent H200 (the greedy layout 1.1% above its lower bound, the rest the exact-size
    # cache's blocks of requests under 1 MiB); the bench's 128K and 256K rows, the 2% target, measure under 0.1%
    assert spare <= 0.05 * counters["peak_allocated"], counters
