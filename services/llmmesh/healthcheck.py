"""`python -m llmmesh.healthcheck HOST:PORT [SERVICE]`: exit 0 only when the server reports SERVING.

Container HEALTHCHECKs run it. It asks the standard `grpc.health.v1` Health service, the same question a
Kubernetes gRPC probe asks, so compose and Kubernetes judge a service by one definition of healthy. Any
other answer (NOT_SERVING, an unknown service name, nothing listening, no reply in time) exits 1, the
code Docker reads as unhealthy.

TLS: `--tls-ca` (the CA that signed the server) switches to TLS; `--tls-cert` and `--tls-key` add the
client certificate that a mutual-TLS service requires. Each defaults to `LLMMESH_HEALTH_TLS_CA_FILE`,
`LLMMESH_HEALTH_TLS_CERT_FILE`, `LLMMESH_HEALTH_TLS_KEY_FILE`, so a container's HEALTHCHECK line stays the same.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.common.tls import client_credentials

__all__ = ["check", "main"]


def check(
    address: str, service: str = "", timeout: float = 3.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """The status `address` reports for `service` ("" = the whole server), or the name of the gRPC error.

    `credentials` (see `llmmesh.common.tls.client_credentials`): TLS; None = plaintext.
    """
    with (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    ) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmmesh-health", description="gRPC health probe: exit 0 when SERVING")
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("service", nargs="?", default="", help="health service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    env = os.environ.get
    parser.add_argument("--tls-ca", default=env("LLMMESH_HEALTH_TLS_CA_FILE", ""), help="CA PEM: use TLS")
    parser.add_argument("--tls-cert", default=env("LLMMESH_HEALTH_TLS_CERT_FILE", ""), help="client certificate PEM")
    parser.add_argument("--tls-key", default=env("LLMMESH_HEALTH_TLS_KEY_FILE", ""), help="client key PEM")
    args = parser.parse_args(argv)
    credentials = client_credentials(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    status = check(args.address, args.service, args.timeout, credentials)
    # Docker keeps the output of the last probes (`docker inspect`): say what was seen.
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
