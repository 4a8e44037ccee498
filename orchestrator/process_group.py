"""DeepSpeed's process group, made the one way every caller makes it (a run's ranks, a benchmark's one-rank group,
the tests' rank processes).

Why not `deepspeed.init_distributed` alone: on a CPU machine its torch backend builds DeepSpeed's shared-memory
all-reduce op for `inference_all_reduce`, which training never calls. Deciding whether it can be built probes every
DeepSpeed op builder (0.08-0.84 s, ~0.1 CPU-s, in each process that makes a group; measured on the 2-core CI-like
machine) and the first build compiles C++ (~21 CPU-seconds on a clean machine). DeepSpeed 0.19.8 reads its compatibility table only there, with
`.get(name, False)`, so a table saying the op is not compatible skips both."""

import torch


def init_process_group(use_cuda: bool) -> None:
    import deepspeed
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # not probed yet: say the op cannot be built, skip the probe
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda and torch.cuda.is_available() else "gloo")
