"""The one line `longtrain train` prints when a worker fails: the worker's own message, whole, and the way out."""

import torch
from ray.train import WorkerGroupError
from ray.train.v2._internal.execution.worker_group.poll import _truncate_error_string

from launch.train_command import _first_line, _no_plan_hint
from spec.config import load_job_config

OOM = ("CUDA out of memory. Tried to allocate 32.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 357.12 MiB "
       "is free. Including non-PyTorch memory, this process has 139.44 GiB memory in use. Of the allocated memory 137.74 "
       "GiB is allocated by PyTorch, and 118.50 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
       "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
       "documentation for Memory Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-"
       "usage-with-pytorch-cuda-alloc-conf)")  # torch's whole message, longer than the half Ray keeps


def _worker_group_error() -> WorkerGroupError:
    """What Ray Train raises: its message is the workers' tracebacks, cut in the middle when long."""
    traceback = "Traceback (most recent call last):\n" + "".join(
        f'  File "/x/site-packages/deepspeed/module_{i}.py", line {i}, in forward\n    y = f(x)\n' for i in range(80))
    text = _truncate_error_string(f"[Rank 0]\n{traceback}torch.OutOfMemoryError: {OOM}")
    assert OOM not in text  # Ray cut the message itself: the line must come from the worker's exception
    return WorkerGroupError(text, {1: RuntimeError("peer rank failed"), 0: torch.OutOfMemoryError(OOM)})


def test_a_worker_failure_is_told_from_the_worker_exception_not_ray_truncated_text():
    assert _first_line(_worker_group_error()) == f"rank 0: {OOM}"


def test_out_of_memory_without_a_plan_says_how_to_make_one():
    job = load_job_config(None, [])
    assert job.plan.path is None
    assert "longtrain plan CONFIG --out plan.yaml" in _no_plan_hint(job, _first_line(_worker_group_error()))
    assert _no_plan_hint(job, _first_line(RuntimeError("NCCL timeout"))) == ""  # only for out of memory
    job.plan.path = "plan.yaml"
    assert _no_plan_hint(job, _first_line(_worker_group_error())) == ""  # a planned job that runs out of memory: not this hint
