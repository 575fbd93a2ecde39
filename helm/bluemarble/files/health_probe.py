"""Kubelet probe of a BlueMarble process when TLS is on: grpc.health.v1 Check over TLS with
the pod's own certificate.

Why: the kubelet's native gRPC probe speaks plaintext only. Exits 0 when SERVING, 1 otherwise.

Usage: health_probe.py HOST:PORT [SERVER_NAME [SERVICE]]
SERVER_NAME is the name the server certificate is checked against (empty or absent: the
host of BLUEMARBLE_ADVERTISE, else HOST). SERVICE is the health service checked (empty or
absent: "", the process; a node's readiness is "bluemarble.v1.ShardNode").
Certificate files: BLUEMARBLE_TLS_CERT/_KEY/_CA.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def server_name(argv: list[str]) -> str:
    """The name the server certificate must carry (see the module docstring)."""
    if len(argv) > 2 and argv[2]:
        return argv[2]
    advertise = os.environ.get("BLUEMARBLE_ADVERTISE", "")
    return (advertise or argv[1]).rpartition(":")[0].strip("[]")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3, 4):
        print(__doc__, file=sys.stderr)
        return 2

    def read(env: str) -> bytes | None:
        path = os.environ.get(env)
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("BLUEMARBLE_TLS_CA"),
        private_key=read("BLUEMARBLE_TLS_KEY"),
        certificate_chain=read("BLUEMARBLE_TLS_CERT"),
    )
    options = [("grpc.ssl_target_name_override", server_name(argv))]
    with grpc.secure_channel(argv[1], credentials, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=argv[3] if len(argv) > 3 else ""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as e:
            print(f"health check of {argv[1]}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"health check of {argv[1]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
