"""The container image's HEALTHCHECK: one grpc.health.v1 Check of the whole server.

    python healthcheck.py [HOST:PORT] [SERVICE]

Exits 0 when the server answers SERVING for SERVICE ("" by default: the whole server), 1 for any
other answer or no answer within 3 seconds, saying which. Plaintext, no credentials: for the
image's default configuration (deploy/config.yaml). It imports grpcio and the health stubs only
(grpcio-health-checking, a dependency of the server), so it costs a fraction of a second.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT_SECONDS = 3.0


def check(address: str, service: str = "", timeout: float = TIMEOUT_SECONDS) -> str:
    """The status name the server gives `service`, or what went wrong."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else DEFAULT_ADDRESS
    service = argv[2] if len(argv) > 2 else ""
    status = check(address, service)
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
