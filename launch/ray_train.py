"""Run a job's workers with Ray Train: connect to Ray, start one worker per device, stream progress back.

Why Ray Train and not a launcher of our own: `TorchTrainer` places the workers, sets up the torch process
group, and with `FailureConfig` restarts the whole group when a worker dies; the worker loop then resumes from
the run's latest complete checkpoint. Workers publish small progress messages to a `ProgressBoard` actor that
the driver polls, so the console works the same on a laptop and on a cluster.
"""

import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from launch import loopback
from launch.host_check import check_cluster_host_memory
from launch.local_head import LocalHead, start_head
from launch.placement import check_capacity
from spec.config import ClusterConfig, JobConfig
from orchestrator.checkpoint import CheckpointRef
from orchestrator.ds_config import uses_cuda
from orchestrator.trainer import WorkerInfo, train

POLL_SECONDS = 0.5


@ray.remote(num_cpus=0)
class ProgressBoard:
    """A mailbox: workers push messages, the driver drains them."""

    def __init__(self):
        self.messages = []

    def push(self, message: Dict[str, Any]) -> None:
        self.messages.append(message)

    def drain(self):
        drained, self.messages = self.messages, []
        return drained


def connect(cluster: ClusterConfig, log_dir: Path) -> None:
    """Start a private Ray on loopback (address=local: `launch.local_head`) or join a running cluster; Ray's logs go
    to log_dir. `disconnect` leaves it (and stops the private one), also when this raises.

    Then settles cluster.use_gpu (unset: GPUs when the cluster has them; locally, when this machine sees CUDA) and
    checks that the workers fit (one line if not). One `ray.init` only: inside a submitted job, a second one after
    `ray.shutdown` loses the job's unpacked working directory (the run directory with it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    _route_ray_logs(log_dir / "ray_driver.log")
    try:
        _init(cluster, {"env_vars": worker_env(cluster)})
        if cluster.use_gpu is None and cluster.address != "local":
            cluster.use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        cluster.use_gpu = uses_cuda(cluster)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        where = "this machine's Ray" if cluster.address == "local" else f"the Ray cluster at {cluster.address}"
        check_capacity(cluster, nodes, cluster.use_gpu, where)
    except BaseException:
        disconnect()
        raise


_local_head: Optional[LocalHead] = None
"""The private head of the local run this process drives (None: none, or a cluster's run)."""


def disconnect(keep_logs_in: Optional[Path] = None) -> None:
    """Leave Ray, and stop the local run's private head (a cluster stays up); its Ray session logs are copied to
    `keep_logs_in` (a failed run's) or go with its temp dir."""
    global _local_head
    ray.shutdown()
    head, _local_head = _local_head, None
    if head is not None:
        head.stop(keep_logs_in)


def _init(cluster: ClusterConfig, runtime_env: Optional[Dict[str, Any]]) -> None:
    global _local_head
    if cluster.address == "local":
        needed = cluster.num_workers * cluster.cpus_per_worker
        with loopback.loopback_only():
            _local_head = start_head(max(os.cpu_count() or 1, needed))
            ray.init(address=_local_head.address, _node_ip_address=loopback.LOOPBACK, log_to_driver=False,
                     logging_level=logging.WARNING, runtime_env=_local_runtime_env(runtime_env or {}))
        loopback.check()
    else:  # the address answered us in the preflight (`launch.ray_address_check`)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env=runtime_env)


LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
"""A private one-machine Ray has no node to drain: Ray Train's preemption watcher (an actor polling the drain state,
~2 CPU-seconds to start) would watch for nothing. Its controller polls the workers every 0.5 s instead of 2 s: a
local run's end (and a dead worker) is seen sooner, and a poll of a few local actors costs next to nothing."""


def _local_runtime_env(runtime_env: Dict[str, Any]) -> Dict[str, Any]:
    env_vars = dict(LOCAL_ONLY_ENV, **runtime_env.get("env_vars", {}))
    return dict(runtime_env, env_vars=env_vars, worker_process_setup_hook=loopback.WORKER_SETUP_HOOK)


def worker_env(cluster: ClusterConfig) -> Dict[str, str]:
    """Environment every worker gets explicitly through the runtime env (a remote node does not inherit the
    driver's). NVLink multicast stays off unless the caller turned it on (it hangs some shared machines)."""
    return {"OMP_NUM_THREADS": str(cluster.cpus_per_worker), "RAY_TRAIN_V2_ENABLED": "1", "PYTHONUNBUFFERED": "1",
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}


def accelerator_env(use_gpu: bool) -> Dict[str, str]:
    """What depends on the device choice, known only after connecting: set in each worker before DeepSpeed loads."""
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}


def run_workers(job: JobConfig, run_dir: Path, initial: Optional[CheckpointRef],
                on_message: Callable[[Dict[str, Any]], None]) -> None:
    """Train with Ray Train; call on_message for each worker message while it runs. Raises if training fails, or
    before any worker starts when a cluster's node cannot hold the workers' host memory (a local run's host was
    checked before Ray started)."""
    gpu = uses_cuda(job.cluster)
    if job.cluster.address != "local":
        check_cluster_host_memory(job, [node for node in ray.nodes() if node.get("Alive")], gpu)
    board = ProgressBoard.remote()
    resources = {"CPU": job.cluster.cpus_per_worker, **({"GPU": job.cluster.gpus_per_worker} if gpu else {})}
    trainer = trainer_type(job.cluster)(
        _worker_loop,
        train_loop_config={"job": job, "run_dir": str(run_dir), "board": board, "initial": initial,
                           "env": accelerator_env(gpu)},
        torch_config=(PlannedAllocatorConfig if job.train.allocator == "planned" else TorchConfig)(
            backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.cluster.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=job.cluster.placement_strategy),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=job.train.max_failures)),
    )
    outcome: Dict[str, Any] = {}
    fit_thread = threading.Thread(target=_fit, args=(trainer, outcome), daemon=True)
    fit_thread.start()
    while fit_thread.is_alive():
        fit_thread.join(POLL_SECONDS)
        for message in ray.get(board.drain.remote()):
            on_message(message)
    for message in ray.get(board.drain.remote()):
        on_message(message)
    if "error" in outcome:
        raise outcome["error"]


class PlannedAllocatorConfig(TorchConfig):
    """Ray Train's torch setup with the replay allocator installed in every worker first (train.allocator=planned).

    Why here: PyTorch swaps a process's CUDA allocator only before CUDA's first use, and Ray Train selects the
    worker's device (`torch.cuda.set_device`, which initialises the allocator) before the training loop runs. The
    backend's start runs on the workers after their devices are made visible and before the process group."""

    @property
    def backend_cls(self):
        return _PlannedAllocatorBackend


class _PlannedAllocatorBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(_install_replay_allocator)
        super().on_start(worker_group, backend_config)


def _install_replay_allocator() -> None:
    from orchestrator.memory import replay_allocator

    replay_allocator.install()


class _Trainer(TorchTrainer):
    """Ray Train's `TorchTrainer` without its Ray Datasets actor: a run passes no `datasets` (each worker reads its
    own windows), yet Ray Train 2.60 starts a `DatasetManager` actor for none, ~4 CPU-seconds a run to start its
    process and load Ray Data. Ray Train makes its parts as callbacks (`_create_default_callbacks`, Ray pinned to
    2.60.0); `tests/test_ray_train_parts.py` fails if an upgrade changes them."""

    DROPPED: Tuple[type, ...] = (DatasetsCallback,)

    def _create_default_callbacks(self) -> list:
        return [callback for callback in super()._create_default_callbacks()
                if not isinstance(callback, self.DROPPED)]


class _LocalTrainer(_Trainer):
    """A local run's: nor the placement-group cleaner, a detached actor that removes the workers' placement group if
    the controller dies (on a cluster that outlives the run), ~4 CPU-seconds more a run; a private head ends with
    its driver, placement groups and all. Nor the autoscaling coordinator (`LocalScalingPolicy`)."""

    DROPPED = _Trainer.DROPPED + (PlacementGroupCleanerCallback,)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = LocalScalingPolicy(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class LocalScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed number of workers without its autoscaling coordinator, a detached actor that asks a
    cluster's autoscaler for the workers' resources (~3 CPU-seconds a run to start): a private head has no
    autoscaler, and its CPUs were sized for the workers before it started."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass


def trainer_type(cluster: ClusterConfig) -> type:
    """The `TorchTrainer` a run on this cluster uses: without the parts it has no use for."""
    return _LocalTrainer if cluster.address == "local" else _Trainer


def _fit(trainer: TorchTrainer, outcome: Dict[str, Any]) -> None:
    try:
        outcome["result"] = trainer.fit()
    except Exception as error:  # re-raised in the driver's thread
        outcome["error"] = error


def _worker_loop(config: Dict[str, Any]) -> None:
    os.environ.update(config["env"])
    context = ray.train.get_context()
    run_dir = Path(config["run_dir"])
    rank = context.get_world_rank()
    _redirect_output(run_dir / "logs" / f"rank{rank}.log")
    (run_dir / "logs" / f"rank{rank}.pid").write_text(str(os.getpid()))  # for operators (and the failure test)
    worker = WorkerInfo(rank=rank, world_size=context.get_world_size(), local_rank=context.get_local_rank(),
                        node=_node_label(context.get_node_rank()))
    board = config["board"]
    train(config["job"], run_dir, worker, lambda message: board.push.remote(message), config["initial"])


def _node_label(node_rank: int) -> str:
    """node{rank}/{host}/{Ray node id}: Ray Train numbers nodes by IP address, so two Ray nodes on one address (a
    test cluster on loopback, containers sharing a host IP) would otherwise be reported as one."""
    return f"node{node_rank}/{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:6]}"


def _redirect_output(log_file: Path) -> None:
    """Send this worker's stdout and stderr (DeepSpeed's chatter included) to a file in the run directory."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_file, "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)


def _route_ray_logs(log_file: Path) -> None:
    handler = logging.FileHandler(log_file)
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
