"""The committed gRPC stubs match what scripts/gen_protos.py generates from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the [dev] extra) is needed to regenerate stubs")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stubs differ from protos/:\n{proc.stdout}{proc.stderr}"


def test_stubs_declare_the_open_inference_protocol():
    from splitinfer.protocol import grpc_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                  "ModelMetadata", "ModelInfer"}
    fields = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
                      "outputs": 6, "raw_input_contents": 7}
    choice = {f.name: f.number for f in pb.InferParameter.DESCRIPTOR.fields}
    assert choice == {"bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4,
                      "uint64_param": 5}
