"""The committed gRPC stubs match what scripts/gen_protos.py generates from protos/."""

from __future__ import annotations

import json
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


# tritonclient registers the same ``inference.*`` symbols in protobuf's default descriptor pool, so it cannot be
# imported into a process that already loaded our stubs: its descriptors are read in a subprocess.
_SHAPES = r"""
import json, sys
from MODULE as pb

def shape(desc):
    out = {}
    for f in desc.fields:
        out[f.name] = [f.number, f.type, f.label, f.message_type.name if f.message_type else None,
                       f.containing_oneof.name if f.containing_oneof else None]
    for nested in desc.nested_types:
        out["<" + nested.name + ">"] = shape(nested)
    return out

svc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
print(json.dumps({
    "package": pb.DESCRIPTOR.package,
    "messages": {name: shape(d) for name, d in pb.DESCRIPTOR.message_types_by_name.items()},
    "methods": {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming,
                         m.server_streaming] for m in svc.methods},
}))
"""


def _descriptor_shapes(module_name: str) -> dict:
    code = _SHAPES.replace("MODULE", module_name)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_declared_message_and_rpc_matches_tritons_own_descriptors():
    """Wire compatibility: what we declare is field-for-field what tritonclient's generated code declares."""
    pytest.importorskip("tritonclient", reason="tritonclient[grpc] (the [dev] extra)")
    ours = _descriptor_shapes("splitinfer.protocol import grpc_service_pb2")
    theirs = _descriptor_shapes("tritonclient.grpc import service_pb2")
    assert ours["package"] == theirs["package"] == "inference"
    for name, shape in ours["messages"].items():
        assert name in theirs["messages"], f"{name} is not a Triton message"
        assert shape == theirs["messages"][name], f"{name} differs from Triton's"
    for name, signature in ours["methods"].items():
        assert signature == theirs["methods"][name], name
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad",
            "RepositoryModelUnload"} <= set(ours["methods"])
