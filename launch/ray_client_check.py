"""One question asked of a `ray://` address before `ray.init` joins it: does its Ray Client server answer us?

Why: `ray.init("ray://HOST:PORT")` against a head with token authentication, from a client without
`RAY_AUTH_MODE=token` (or with the wrong token), retries for about 30 s and then says only "ray client connection
timeout", the same words as for a closed port. One ping (Ray's own ClusterInfo PING, on a channel built by Ray's
own `init_grpc_channel`, which adds the token when this process's auth mode asks for one) tells the two apart in
a second, so the user reads the cause and the fix.
"""

import os
from typing import Optional

from spec.errors import ConfigError

PING_SECONDS = 10.0


def check_ray_client(address: str, timeout: float = PING_SECONDS) -> None:
    """Raise a one-line ConfigError naming the cause when the Ray Client server at `address` (ray://HOST:PORT)
    refuses us or cannot be reached; return when it answers."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

    target = address.removeprefix("ray://")
    channel = init_grpc_channel(target, options=[("grpc.max_receive_message_length", 64 * 2**20)])
    try:
        request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=timeout)
    except grpc.RpcError as error:
        raise ConfigError(ray_client_problem(address, error.code(), error.details() or "")) from error
    finally:
        channel.close()


def ray_client_problem(address: str, code, details: str) -> str:
    """The one line for a refused or unreachable Ray Client server (`code`: the gRPC status code)."""
    import grpc

    where = f"cluster.address ({address})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            return (f"{where}: the cluster asks for a token (Ray token authentication) and this machine sends none; "
                    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on "
                    "the head prints it; or put it in ~/.ray/auth_token)")
        return (f"{where}: the cluster refused our token ({_short(details)}); set RAY_AUTH_TOKEN (or "
                "~/.ray/auth_token) to the cluster's token (`ray get-auth-token` on the head prints it)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return (f"{where}: no Ray Client server answers there ({_short(details) or code.name}); check the host and "
                "port (the head's --ray-client-server-port, default 10001) and that the head runs, or use "
                "cluster.address=local")
    return f"{where}: the Ray Client server answered {code.name} ({_short(details)}); check the cluster's logs"


def _short(details: Optional[str]) -> str:
    return (details or "").splitlines()[0][:160] if details else ""
