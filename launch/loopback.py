"""A local run's private Ray stays private: every server it starts listens on 127.0.0.1, with token authentication.

Why these three levers: Ray 2.60 turns `ray.init(_node_ip_address="127.0.0.1")` into the machine's network address
(`ray._private.services.resolve_ip_for_localhost`) unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is off; with a
loopback node address the GCS, the raylet, the dashboard and runtime-env agents, the metrics ports and every
worker's gRPC server bind to loopback (checked by tests/test_ray_loopback.py). A new local cluster turns Ray's token
authentication on unless `RAY_AUTH_MODE` says otherwise, so a `disabled` there is dropped for local runs. The last
server is torch's: Ray Train's `env://` rendezvous makes rank 0 host a TCP store, which binds every interface; the
worker setup hook replaces torch's `env://` handler with one that hands the store a socket bound to loopback
(`TCPStore(master_listen_fd=...)`, torch's documented way to choose the listening socket).
"""

import importlib
import os
import socket
from contextlib import contextmanager
from datetime import timedelta
from typing import Dict, Iterator
from urllib.parse import parse_qs, urlparse

from spec.errors import LongtrainError

LOOPBACK = "127.0.0.1"
_CLUSTER_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
WORKER_SETUP_HOOK = "launch.loopback.install_rendezvous"
"""Ray's runtime_env `worker_process_setup_hook`: runs in every worker process of a local run at its start."""


@contextmanager
def loopback_only() -> Iterator[None]:
    """Around the start of a local run's head (`launch.local_head`: the GCS and the raylet, whose children, the
    agents and the workers, inherit their environment) and the driver's `ray.init` joining it. The variable is read
    when Ray is imported, so the driver's already imported copy is set too; both are put back afterwards, so a later
    `ray start` from this process (a test cluster of several nodes, which the variable would refuse) is not
    affected."""
    from ray._private import ray_constants

    saved = os.environ.get(_CLUSTER_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        os.environ.pop("RAY_AUTH_MODE")
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop(_CLUSTER_VAR, None)
        else:
            os.environ[_CLUSTER_VAR] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def check() -> None:
    """After `ray.init`: the node address Ray settled on must be loopback (one line otherwise; the caller stops
    the Ray it started)."""
    import ray

    address = ray.util.get_node_ip_address()
    if address != LOOPBACK:
        raise LongtrainError(f"the private Ray started on {address}, not on {LOOPBACK}; this Ray does not honour "
                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: install the ray version pyproject.toml pins")


def install_rendezvous() -> None:
    """Worker setup hook: torch's `env://` rendezvous, with rank 0's TCP store listening on loopback only. torch
    refuses to register a scheme twice, so its own `env` entry is dropped from its table first."""
    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module (the package exports a
    rendezvous._rendezvous_handlers.pop("env", None)                      # function of the same name)
    rendezvous.register_rendezvous_handler("env", _loopback_env_rendezvous)


def _loopback_env_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **_):
    """torch's env:// handler (rank and world size from the URL or RANK/WORLD_SIZE, the store at
    MASTER_ADDR:MASTER_PORT), except that rank 0 binds the store's socket to loopback itself."""
    from torch.distributed import TCPStore

    found = _query(url)
    rank = int(found.get("rank", os.environ["RANK"]))
    world = int(found.get("world_size", os.environ["WORLD_SIZE"]))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        listener = socket.create_server((LOOPBACK, port))
        store = TCPStore(host, port, world, True, timeout, master_listen_fd=listener.detach())
    else:
        store = TCPStore(host, port, world, False, timeout)
    yield store, rank, world
    raise RuntimeError("env:// rendezvous on loopback cannot re-rendezvous")


def _query(url: str) -> Dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlparse(url).query).items()}
