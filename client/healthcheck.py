"""``asr-healthcheck``: ask a server's ``grpc.health.v1.Health/Check``; exit 0 only when SERVING.

Used as the container's HEALTHCHECK (see the Dockerfile) and handy by hand. The
server reports SERVING once its model is loaded and warmed up, and NOT_SERVING
while it shuts down. Exit codes: 0 SERVING, 1 anything else (NOT_SERVING,
unknown service, unreachable, timeout). It never imports server code.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.connection import Connection, ConnectionOptionError, add_connection_args, connection_from_args


def check(address: str | Connection, service: str = "", timeout: float = 3.0) -> str:
    """The serving status name of ``service`` ("" = the whole server) at ``address``
    (HOST:PORT, or a ``Connection`` for TLS / a token)."""
    connection = address if isinstance(address, Connection) else Connection(address)
    with connection.sync_channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                              metadata=connection.metadata)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asr-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=f"127.0.0.1:{os.environ.get('ASR_PORT', '50051')}",
                        help="HOST:PORT of the server (default: 127.0.0.1 and $ASR_PORT or 50051)")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_connection_args(parser)
    args = parser.parse_args(argv)
    try:
        connection = connection_from_args(args)
    except ConnectionOptionError as exc:
        parser.error(str(exc))
    try:
        status = check(connection, args.service, args.timeout)
    except grpc.RpcError as exc:
        print(f"asr-healthcheck: {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
