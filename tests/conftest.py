"""Shared test helpers: the debug model shape, a skip marker for GPU-only tests, a free port, and rank processes
in a gloo process group (what the multi-rank tests run in, without Ray)."""

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.process_group import init_process_group
from spec.config import ModelConfig, load_job_config

os.environ.setdefault("RAY_worker_niceness", "0")
"""Ray starts its workers at nice 15; beside a test computing in its own process (two files run at a time) a Ray
run's workers then got ~5% of a core and stalled for minutes. Inherited by every Ray a test starts."""

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
"""Two files at a time on two cores (pytest-xdist): each worker's own tensor work gets its share of the cores, not
torch's default of every core, so the workers' threads do not fight over them (processes a test spawns set their
own, as a run's workers do)."""

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")


def pytest_collection_modifyitems(config, items) -> None:
    """The files with `slow` tests (Ray and DeepSpeed runs) first, each file's tests kept together and in order: the
    suite runs two files at a time (pytest-xdist, `--dist loadfile` in pyproject.toml), and a long file started last
    would run alone while the other worker sits idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture
def debug_model_config() -> ModelConfig:
    return load_job_config(None, []).model


def free_port() -> int:
    """A free TCP port on loopback for a spawned test's process group (gloo or NCCL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RANK_PRELOAD = ["torch", "deepspeed", "orchestrator.trainer", "tests.conftest",
                "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                "deepspeed.runtime.zero.muon.original_muon", "deepspeed.module_inject", "deepspeed.ops.triton_ops",
                "deepspeed.runtime.superoffload", "torch._dynamo", "torch._inductor.compile_fx",
                "torch.utils.serialization", "peft"]
"""What every rank process needs, imported once per test process by multiprocessing's fork server: each rank is
a fresh fork of it instead of a fresh interpreter importing torch and DeepSpeed again (about 4 CPU-seconds a
process, most of a short run's cost; the suite starts a few hundred). Past the first four, what a rank imported
on its own when DeepSpeed built its engine (torch.compile's dynamo and inductor through DeepSpeed's Muon module,
sympy, networkx, DTensor) and peft for LoRA runs: a 6-step one-rank run's process 2.2-3.4 CPU-s -> 0.6-1.3."""


def spawn_gloo(fn: Callable, world: int, *args: Any) -> List[Any]:
    """Run `fn(rank, world, put, *args)` in `world` new processes joined in one gloo process group on loopback
    (DeepSpeed on its CPU accelerator); returns what the ranks `put`, in arrival order. `fn` must be a module-level
    function (it is pickled). Each rank is forked from the fork server (`RANK_PRELOAD`) and gets this process's
    environment as it is now, as a spawned process would."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)
    with context.Manager() as manager:
        queue = manager.Queue()
        mp.start_processes(_gloo_rank, args=(world, free_port(), fn, args, queue, dict(os.environ)), nprocs=world,
                           start_method="forkserver", join=True)
        results = []
        while not queue.empty():
            results.append(queue.get())
    return results


def train_without_ray(run_dir: Path, world: int, overrides: List[str]) -> List[Any]:
    """The messages of a run of the real trainer (`orchestrator.trainer.train`: DeepSpeed over gloo) in `world`
    spawned processes, without Ray or the driver: the reference a `longtrain train` run is compared with, at a
    fraction of its cost (no Ray, no Ray Train actors). The workers' arithmetic is the same: the trainer sets its
    own seed and thread count, so the losses are bit for bit those of the Ray run of the same job."""
    job = load_job_config(None, [f"cluster.num_workers={world}", *overrides])
    return spawn_gloo(train_rank, world, job, str(run_dir))


def step_losses(messages: List[Any]) -> dict:
    """{step: each rank's loss, in rank order} of a run's step messages (a worker's, or metrics.jsonl's rows)."""
    return {m["step"]: [r["loss"] for r in sorted(m["rows"], key=lambda r: r["rank"])]
            for m in messages if m.get("kind", "step") == "step" and m.get("rows")}


def train_rank(rank: int, world: int, put, job, run_dir: str) -> None:
    """One rank of the real trainer for `spawn_gloo`: its messages go to `put`."""
    from orchestrator.trainer import WorkerInfo, train

    train(job, Path(run_dir), WorkerInfo(rank, world, rank, "node0"), put)


def _gloo_rank(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, environment: dict) -> None:
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    init_process_group(use_cuda=False)  # DeepSpeed's group (an engine built in `fn` would make it, its own way)
    fn(rank, world, queue.put, *args)
    dist.destroy_process_group()
    os._exit(0)  # the results are sent: skip C++ static teardown, which now and then aborts (std::terminate with
    # no Python frame, about 1 in 9 two-rank ZeRO-3 processes, also before any resume code ran)


def loss_and_grads(model, inputs, targets):
    """One step's loss and every trained parameter's gradient (cloned; a frozen LoRA base has none), from zeroed
    gradients: what the memory techniques' parity tests compare bit for bit."""
    model.zero_grad(set_to_none=True)
    loss = model(inputs, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def layer_plans(decisions) -> list:
    """`LayerPlan` records from per-layer decisions, each (keep, swap, recompute[, offload_skeletal[, swap_codec]]):
    a list (the layer is the position) or a dict by layer."""
    from spec.plan import LayerPlan

    items = decisions.items() if isinstance(decisions, dict) else enumerate(decisions)
    return [LayerPlan(index, *decision) for index, decision in items]


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the same float reductions (so the same training) on every machine, and no
    oversubscription of a loaded CI machine by a test whose tensors are small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mount_tmpfs(path: Path, size: str) -> None:
    """A tmpfs of `size` at `path` (a disk that fills): skips where mounting needs a root this machine lacks."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small tmpfs needs root (mount -t tmpfs); run as root to test a full disk")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")



class StorageTracker(TorchDispatchMode):
    """A dispatch mode that records every storage an op makes while active, held weakly: `live_bytes()` are those
    still alive now, `peak` the most alive after any op (what a memory test compares with a plan)."""

    def __init__(self):
        super().__init__()
        self.made, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr():
                storage = tensor.untyped_storage()
                self.made[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.made.values() if not ref.expired())


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group in this process (what a DeepSpeed engine needs, on its CPU accelerator), gone after the
    module."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from deepspeed.utils import groups

    init_process_group(use_cuda=False)
    groups._WORLD_GROUP = None  # DeepSpeed's cached clone of the world group: stale if an earlier test's group is gone
    try:
        yield
    finally:
        dist.destroy_process_group()
