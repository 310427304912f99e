"""A stock ``tritonclient.grpc`` client in its own process (it and this project's protocol stubs both register the
protobuf package ``inference``, so they cannot share one): reads a JSON job on stdin — ``address``, ``model``,
``requests`` (each ``payload_hex`` and ``parameters``) — sends each as the edge agent does (input ``features`` UINT8
``[payload_bytes]``, request parameters) and prints one JSON object: ``logits`` per request, or ``error``."""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def main() -> int:
    job = json.load(sys.stdin)
    client = tc.InferenceServerClient(job["address"])
    out = []
    for req in job["requests"]:
        payload = np.frombuffer(bytes.fromhex(req["payload_hex"]), dtype=np.uint8)
        tensor = tc.InferInput("features", [int(payload.size)], "UINT8")
        tensor.set_data_from_numpy(payload)
        try:
            result = client.infer(job["model"], [tensor], parameters=req["parameters"])
            out.append({"logits": result.as_numpy("logits").tolist()})
        except InferenceServerException as exc:
            out.append({"error": str(exc), "status": exc.status()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
