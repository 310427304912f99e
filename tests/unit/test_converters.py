"""protobuf <-> numpy mapping of the Open Inference Protocol (splitinfer.protocol.converters)."""

from __future__ import annotations

import numpy as np
import pytest

from splitinfer.errors import InvalidInput
from splitinfer.protocol import converters as cv
from splitinfer.protocol import grpc_service_pb2 as pb


def _request(*tensors: cv.InferTensor, raw: bool = True, **params) -> pb.ModelInferRequest:
    req = cv.InferRequest(model_name="m", inputs=list(tensors), parameters=params)
    return cv.request_to_proto(req, raw=raw)


# ------------------------------------------------------------------------------------------------ parameters


def test_parameters_round_trip_every_kind():
    values = {"b": True, "i": -5, "big": 2**63 + 7, "f": 0.25, "s": "1,48,14,14", "np_i": np.int64(3),
              "np_f": np.float32(1.5), "np_b": np.bool_(False)}
    msg = pb.ModelInferRequest()
    cv.dict_to_parameters(values, msg.parameters)
    assert msg.parameters["b"].WhichOneof("parameter_choice") == "bool_param"
    assert msg.parameters["i"].WhichOneof("parameter_choice") == "int64_param"
    assert msg.parameters["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert msg.parameters["f"].WhichOneof("parameter_choice") == "double_param"
    assert msg.parameters["s"].WhichOneof("parameter_choice") == "string_param"
    back = cv.parameters_to_dict(pb.ModelInferRequest.FromString(msg.SerializeToString()).parameters)
    assert back == {"b": True, "i": -5, "big": 2**63 + 7, "f": 0.25, "s": "1,48,14,14", "np_i": 3,
                    "np_f": 1.5, "np_b": False}
    assert type(back["b"]) is bool and type(back["i"]) is int and type(back["f"]) is float


@pytest.mark.parametrize("value", [None, [1, 2], 2**64, -(2**63) - 1, b"raw"])
def test_parameter_of_unsupported_value_is_refused(value):
    msg = pb.ModelInferRequest()
    with pytest.raises(InvalidInput, match="parameter 'x'"):
        cv.dict_to_parameters({"x": value}, msg.parameters)


def test_parameter_without_value_is_refused():
    msg = pb.ModelInferRequest()
    msg.parameters["empty"].Clear()
    with pytest.raises(InvalidInput, match="'empty' has no value"):
        cv.parameters_to_dict(msg.parameters)


# --------------------------------------------------------------------------------------------------- tensors

ARRAYS = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.arange(12, dtype=np.uint8).reshape(3, 4),
    "UINT16": np.array([0, 65535], dtype=np.uint16),
    "UINT32": np.array([1, 2**32 - 1], dtype=np.uint32),
    "UINT64": np.array([2**64 - 1], dtype=np.uint64),
    "INT8": np.array([-128, 127], dtype=np.int8),
    "INT16": np.array([[-3], [4]], dtype=np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "FP32": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
    "FP64": np.array([np.pi], dtype=np.float64),
}


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_tensor_round_trip(datatype, raw):
    arr = ARRAYS[datatype]
    assert cv.datatype_of(arr) == datatype
    msg = _request(cv.InferTensor("t", datatype, arr), raw=raw, split=3)
    assert bool(msg.raw_input_contents) is raw
    req = cv.request_from_proto(pb.ModelInferRequest.FromString(msg.SerializeToString()))
    (t,) = req.inputs
    assert t.name == "t" and t.datatype == datatype and t.shape == list(arr.shape)
    assert t.data.dtype == cv.DATATYPES[datatype].dtype
    np.testing.assert_array_equal(t.data, arr)
    assert req.parameters == {"split": 3}


def test_fp16_travels_raw_only():
    arr = np.array([1.5, -2.0], dtype=np.float16)
    req = cv.request_from_proto(_request(cv.InferTensor("h", "FP16", arr)))
    np.testing.assert_array_equal(req.inputs[0].data, arr)
    with pytest.raises(InvalidInput, match="only travel in raw"):
        _request(cv.InferTensor("h", "FP16", arr), raw=False)


def test_zero_sized_tensor_is_fine():
    req = cv.request_from_proto(_request(cv.InferTensor("e", "FP32", np.zeros((0, 3), np.float32))))
    assert req.inputs[0].shape == [0, 3]


def test_response_round_trip_uses_raw_output_contents():
    logits = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    resp = cv.InferResponse(model_name="m", model_version="1", id="abc", parameters={"server_queue_ms": 1.5},
                            outputs=[cv.InferTensor("logits", "FP32", logits)])
    msg = cv.response_to_proto(resp)
    assert len(msg.raw_output_contents) == 1 and not msg.outputs[0].HasField("contents")
    back = cv.response_from_proto(pb.ModelInferResponse.FromString(msg.SerializeToString()))
    assert (back.model_name, back.model_version, back.id) == ("m", "1", "abc")
    assert back.parameters == {"server_queue_ms": 1.5}
    np.testing.assert_array_equal(back.outputs[0].data, logits)


def test_metadata_to_proto():
    meta = cv.ModelMetadata("m", ["1"], "p", [cv.TensorMetadata("features", "UINT8", [-1])],
                            [cv.TensorMetadata("logits", "FP32", [-1, 10])])
    msg = cv.model_metadata_to_proto(meta)
    assert msg.inputs[0].name == "features" and list(msg.inputs[0].shape) == [-1]
    assert list(msg.outputs[0].shape) == [-1, 10] and list(msg.versions) == ["1"]
    smsg = cv.server_metadata_to_proto(cv.ServerMetadata("s", "0.1", ["x"]))
    assert (smsg.name, smsg.version, list(smsg.extensions)) == ("s", "0.1", ["x"])


# ---------------------------------------------------------------------------------------- malformed tensors


def _raw_input(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="t", datatype=datatype, shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


def _typed_input(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="t", datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents))
    return msg


def _two_inputs_one_raw() -> pb.ModelInferRequest:
    msg = _raw_input("UINT8", [2], b"ab")
    msg.inputs.add(name="u", datatype="UINT8", shape=[1])
    return msg


def _raw_and_typed() -> pb.ModelInferRequest:
    msg = _raw_input("FP32", [1], b"\0\0\0\0")
    msg.inputs[0].contents.fp32_contents.append(1.0)
    return msg


def _duplicate_names() -> pb.ModelInferRequest:
    msg = _typed_input("FP32", [1], fp32_contents=[1.0])
    msg.inputs.add(name="t", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[2.0]))
    return msg


def _unnamed() -> pb.ModelInferRequest:
    msg = _typed_input("FP32", [1], fp32_contents=[1.0])
    msg.inputs[0].name = ""
    return msg


MALFORMED = {
    "unsupported datatype": (lambda: _raw_input("BF16", [1], b"\0\0"), "unsupported datatype 'BF16'"),
    "BYTES unsupported": (lambda: _typed_input("BYTES", [1], bytes_contents=[b"x"]), "unsupported datatype"),
    "lowercase datatype": (lambda: _raw_input("fp32", [1], b"\0\0\0\0"), "unsupported datatype 'fp32'"),
    "truncated raw": (lambda: _raw_input("FP32", [2, 2], b"\0" * 15), "truncated raw contents, 15 bytes"),
    "oversized raw": (lambda: _raw_input("UINT8", [4], b"\0" * 5), "oversized raw contents, 5 bytes"),
    "negative dim": (lambda: _raw_input("UINT8", [-1], b""), "negative dimension"),
    "too many dims": (lambda: _raw_input("UINT8", [1] * 17, b"\0"), "at most 16"),
    "huge shape": (lambda: _raw_input("FP32", [2**40, 2**40], b"\0" * 8), "dimension above"),
    "huge zero-size shape": (lambda: _raw_input("FP32", [0, 2**62, 2**62], b""), "dimension above"),
    "bad BOOL byte": (lambda: _raw_input("BOOL", [2], b"\x00\x07"), "only bytes 0 and 1"),
    "element count": (lambda: _typed_input("FP32", [2, 3], fp32_contents=[1.0] * 5),
                      "5 values in fp32_contents, but shape \\[2, 3\\] has 6"),
    "no contents": (lambda: _typed_input("INT64", [3]), "0 values in int64_contents"),
    "wrong typed field": (lambda: _typed_input("FP32", [1], fp32_contents=[1.0], int_contents=[1]),
                          "takes fp32_contents, but int_contents is set"),
    "typed out of range": (lambda: _typed_input("UINT8", [2], uint_contents=[1, 256]),
                           "outside the range of UINT8"),
    "typed INT8 underflow": (lambda: _typed_input("INT8", [1], int_contents=[-129]),
                             "outside the range of INT8"),
    "raw count mismatch": (_two_inputs_one_raw, "raw_input_contents has 1 entries but there are 2 inputs"),
    "raw and typed": (_raw_and_typed, "both typed contents and raw_input_contents"),
    "duplicate names": (_duplicate_names, "appears more than once"),
    "unnamed input": (_unnamed, "has no name"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_invalid_input(case):
    build, message = MALFORMED[case]
    with pytest.raises(InvalidInput, match=message):
        cv.request_from_proto(build())


def test_error_names_the_tensor():
    with pytest.raises(InvalidInput, match="input 't'"):
        cv.request_from_proto(_raw_input("FP32", [3], b"\0"))


def test_malformed_response_is_invalid_input():
    msg = pb.ModelInferResponse(model_name="m")
    msg.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    msg.raw_output_contents.append(b"\0" * 39)
    with pytest.raises(InvalidInput, match="output 'logits': truncated"):
        cv.response_from_proto(msg)


def test_unknown_numpy_dtype_has_no_datatype():
    with pytest.raises(InvalidInput):
        cv.datatype_of(np.array(["a"]))
