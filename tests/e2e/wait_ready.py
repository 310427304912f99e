"""Wait until a daemon the README started in the background answers, as a user would before the next command.

``python -m tests.e2e.wait_ready grpc HOST:PORT PID [CA CERT KEY]``: the cloud server's gRPC health check
says SERVING (over mutual TLS when CA, CERT and KEY are given). ``python -m tests.e2e.wait_ready http URL PID``:
the URL answers 200 (the edge agent's ``/readyz``). Exits 1 with a message if PID dies first or after 120 s.
The checks are :mod:`splitinfer.daemons`'; the daemon is the shell's child, so it is watched by its PID.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from splitinfer.daemons import SERVING, grpc_health_status, http_ok, wait_until

TIMEOUT_S = 120.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str]) -> int:
    kind, target, pid = argv[0], argv[1], int(argv[2])
    if kind == "grpc":
        credentials = None
        if argv[3:6]:
            import grpc

            ca, cert, key = (Path(p).read_bytes() for p in argv[3:6])
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
        outcome = wait_until(lambda: grpc_health_status(target, credentials=credentials) == SERVING,
                             lambda: _alive(pid), TIMEOUT_S)
    else:
        outcome = wait_until(lambda: http_ok(target), lambda: _alive(pid), TIMEOUT_S)
    if outcome == "exited":
        print(f"wait_ready: the daemon (pid {pid}) exited before {target} answered", file=sys.stderr)
    elif outcome == "timeout":
        print(f"wait_ready: {target} did not answer within {TIMEOUT_S:.0f} s", file=sys.stderr)
    return 0 if outcome == "ready" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
