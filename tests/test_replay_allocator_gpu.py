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
    layout = replay.lay_out(step)  # the library's C++ best fit, as the trainer and the bench lay out
    replay.reset_peaks()
    with replay.window():
        step()
    c = replay.counters()
    counters = dict(planned=layout.planned, fallbacks=c.fallbacks, mismatches=c.mismatches, overlaps=c.overlaps,
                    arena=c.arena, lower_bound=layout.lower_bound_bytes,
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
    assert counters["planned"] > 50 and counters["fallbacks"] == 0, counters
    assert counters["arena"] == counters["lower_bound"] or counters["arena"] <= 1.05 * counters["lower_bound"]
    spare = counters["peak_reserved"] - counters["peak_allocated"]
    # 3.4% at this small shape on a lent H200 (the greedy layout 1.1% above its lower bound, the rest the exact-size
    # cache's blocks of requests under 1 MiB); the bench's 128K and 256K rows, the 2% target, measure under 0.1%
    assert spare <= 0.05 * counters["peak_allocated"], counters


TRAIN = """
import json, os, sys
from pathlib import Path
allocator, run_dir = sys.argv[1], sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cuda")
if allocator == "planned":  # what the launcher's Ray Train backend does before the worker's device is chosen
    from orchestrator.memory import replay_allocator
    replay_allocator.install()
from orchestrator.process_group import init_process_group
from orchestrator.trainer import WorkerInfo, train
from spec.config import load_job_config

job = load_job_config(None, ["cluster.num_workers=1", "cluster.use_gpu=true", f"train.allocator={allocator}",
                             "model.num_layers=2", "model.hidden_size=1024", "model.intermediate_size=2816",
                             "model.num_heads=8", "model.num_kv_heads=8", "data.seq_len=8192",
                             "data.source=synthetic", "train.max_steps=5", "train.log_every_steps=1", "optim.warmup_steps=2",
                             "checkpoint.every_steps=0", "checkpoint.at_end=false"])
init_process_group(use_cuda=True)
messages = []
train(job, Path(run_dir), WorkerInfo(0, 1, 0, "node0"), messages.append)
json.dump([m["rows"][0] for m in messages if m["kind"] == "step"], open(Path(run_dir) / "rows.json", "w"))
"""


def _train(allocator: str, run_dir, port: int) -> list:
    run_dir.mkdir()
    done = subprocess.run([sys.executable, "-c", TRAIN, allocator, str(run_dir), str(port)], capture_output=True,
                          text=True, env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "rows.json").read_text())


def test_a_training_run_under_the_planned_allocator_replays_from_step_3_with_the_caching_runs_losses(tmp_path):
    """The trainer's loop (`train.allocator=planned`, DeepSpeed, without Ray): step 1 warms up, step 2 is traced,
    steps 3-5 are served at its offsets with no fallback, and the losses are the caching allocator's run's."""
    caching = _train("caching", tmp_path / "caching", 29561)
    planned = _train("planned", tmp_path / "planned", 29562)
    assert [r["step"] for r in planned] == [1, 2, 3, 4, 5]
    assert [r.get("replay_gib", 0) > 0 for r in planned] == [False, False, True, True, True]
    assert all(r["replay_fallbacks"] == 0 for r in planned[2:]), planned
    for a, b in zip(caching, planned):
        assert abs(a["loss"] - b["loss"]) <= 1e-2 * abs(a["loss"]), (a["loss"], b["loss"])
    last = planned[-1]  # peaks since the layout was laid down
    assert last["peak_reserved_gib"] - last["peak_allocated_gib"] <= 0.05 * last["peak_allocated_gib"], last
