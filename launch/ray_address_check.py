"""One question asked of a cluster address before `ray.init` joins it: does the Ray server there answer us?

Why: against a head with token authentication, from a client without `RAY_AUTH_MODE=token` (or with the wrong
token), `ray.init` retries and then fails without naming the cause: for `ray://HOST:PORT` after about 30 s with
"ray client connection timeout", the same words as for a closed port; for a GCS address (`HOST:PORT`, or `auto` and
the address it finds) after about 20 s with a traceback ending in "Failed to connect to GCS". One call on a channel
built by Ray's own `init_grpc_channel` (which adds the token when this process's auth mode asks for one) tells the
causes apart in a second: the Ray Client server's ClusterInfo PING, or the GCS's GetClusterId (the first call Ray's
own GCS client makes).
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

from spec.errors import ConfigError

ASK_SECONDS = 10.0
MAX_MESSAGE_BYTES = 64 * 2**20
WHERE_THE_TOKEN_IS = "(`ray get-auth-token` on the head prints it; or put it in ~/.ray/auth_token)"


def _ping_ray_client(channel, timeout: float) -> None:
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
    ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=timeout)


def _ask_gcs_cluster_id(channel, timeout: float) -> None:
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                       timeout=timeout)


@dataclass(frozen=True)
class RayServer:
    """What an address points at: its name in messages, the head's flag for its port, and the call that asks it."""

    name: str
    port: str
    ask: Callable[..., None]


RAY_CLIENT = RayServer("Ray Client server", "the head's --ray-client-server-port, default 10001", _ping_ray_client)
GCS = RayServer("Ray GCS", "the head's --port, default 6379", _ask_gcs_cluster_id)


def check_cluster_address(address: str, timeout: float = ASK_SECONDS) -> None:
    """Raise a one-line ConfigError naming the cause when the Ray Client server (ray://HOST:PORT) or the GCS
    (HOST:PORT, auto) at `address` refuses us or cannot be reached; return when it answers. `auto` is resolved as
    `ray.init` resolves it (RAY_ADDRESS, then the cluster `ray start` recorded on this machine)."""
    if address.startswith("ray://"):
        _ask(RAY_CLIENT, address, address.removeprefix("ray://"), timeout)
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        target = canonicalize_bootstrap_address(address)  # what ray.init connects to (loopback as this node's IP)
    except (ConnectionError, ValueError) as error:
        raise ConfigError(f"cluster.address ({address}): {_short(str(error))}; start a cluster (`ray start --head`) "
                          "and give its HOST:PORT, or use cluster.address=local") from error
    _ask(GCS, f"auto: {target}" if address == "auto" else address, target, timeout)


def _ask(server: RayServer, shown: str, target: str, timeout: float) -> None:
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.exceptions import AuthenticationError

    channel = init_grpc_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    try:
        server.ask(channel, timeout)
    except grpc.RpcError as error:
        raise ConfigError(address_problem(shown, server, error.code(), error.details() or "")) from error
    except AuthenticationError as error:  # raised here, before anything is sent: token mode and no token found
        raise ConfigError(f"cluster.address ({shown}): RAY_AUTH_MODE=token and no token is set on this machine; set "
                          f"RAY_AUTH_TOKEN to the cluster's token {WHERE_THE_TOKEN_IS}") from error
    finally:
        channel.close()


def address_problem(address: str, server: RayServer, code, details: str) -> str:
    """The one line for a Ray server that refused us or did not answer (`code`: the gRPC status code)."""
    import grpc

    where = f"cluster.address ({address})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            return (f"{where}: the cluster asks for a token (Ray token authentication) and this machine sends none; "
                    f"set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token {WHERE_THE_TOKEN_IS}")
        return (f"{where}: the cluster refused our token ({_short(details)}); set RAY_AUTH_TOKEN to the cluster's "
                f"token {WHERE_THE_TOKEN_IS}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return (f"{where}: no {server.name} answers there ({_short(details) or code.name}); check the host and port "
                f"({server.port}) and that the head runs, or use cluster.address=local")
    return f"{where}: the {server.name} answered {code.name} ({_short(details)}); check the cluster's logs"


def _short(details: Optional[str]) -> str:
    return (details or "").splitlines()[0][:160] if details else ""
