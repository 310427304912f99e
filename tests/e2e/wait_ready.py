"""Wait until a daemon the README started in the background answers, as a user would before the next command.

``python -m tests.e2e.wait_ready grpc HOST:PORT PID [CA CERT KEY]``: the cloud server's gRPC health check
says SERVING (over mutual TLS when CA, CERT and KEY are given). ``python -m tests.e2e.wait_ready http URL PID``:
the URL answers 200 (the edge agent's ``/readyz``). Exits 1 with a message if PID dies first or after 120 s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

TIMEOUT_S = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _grpc_ready(address: str, tls: list[str]):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls:
        ca, cert, key = (Path(p).read_bytes() for p in tls)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    def check() -> bool:
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status == 1
        except grpc.RpcError:
            return False

    return check


def _http_ready(url: str):
    import httpx

    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def main(argv: list[str]) -> int:
    kind, target, pid = argv[0], argv[1], int(argv[2])
    check = _grpc_ready(target, argv[3:6]) if kind == "grpc" else _http_ready(target)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if check():
            return 0
        if not _alive(pid):
            print(f"wait_ready: the daemon (pid {pid}) exited before {target} answered", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"wait_ready: {target} did not answer within {TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
