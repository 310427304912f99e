"""The one mapping between Open Inference Protocol v2 protobuf messages and numpy / plain Python values.

Everything that reads or writes ``InferParameter``, ``InferTensorContents`` or ``raw_*_contents`` lives
here; the rest of the code works with the small dataclasses below (:class:`InferTensor`,
:class:`InferRequest`, :class:`InferResponse`, metadata). Malformed messages raise
:class:`~splitinfer.errors.InvalidInput` with a message naming the tensor or parameter and what was wrong.

Tensor data rules (from the spec): either every input carries its data in ``raw_input_contents`` (one
little-endian byte string per input, in order) or every input carries typed ``contents``; mixing the two
is refused. ``BYTES`` tensors are not supported by this server (nothing in the wire contract uses them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitinfer.errors import InvalidInput
from splitinfer.protocol import grpc_service_pb2 as pb

ParamValue = bool | int | float | str
MAX_DIMS = 16
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


@dataclass(frozen=True)
class _DataType:
    dtype: np.dtype
    contents_field: str | None  # typed contents field of InferTensorContents (None: raw only)


DATATYPES: dict[str, _DataType] = {
    "BOOL": _DataType(np.dtype("?"), "bool_contents"),
    "UINT8": _DataType(np.dtype("u1"), "uint_contents"),
    "UINT16": _DataType(np.dtype("<u2"), "uint_contents"),
    "UINT32": _DataType(np.dtype("<u4"), "uint_contents"),
    "UINT64": _DataType(np.dtype("<u8"), "uint64_contents"),
    "INT8": _DataType(np.dtype("i1"), "int_contents"),
    "INT16": _DataType(np.dtype("<i2"), "int_contents"),
    "INT32": _DataType(np.dtype("<i4"), "int_contents"),
    "INT64": _DataType(np.dtype("<i8"), "int64_contents"),
    "FP16": _DataType(np.dtype("<f2"), None),
    "FP32": _DataType(np.dtype("<f4"), "fp32_contents"),
    "FP64": _DataType(np.dtype("<f8"), "fp64_contents"),
}
"""Supported OIP datatypes: numpy dtype (little-endian, as on the wire) and typed contents field."""

_CONTENTS_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                    "fp32_contents", "fp64_contents", "bytes_contents")


@dataclass
class InferTensor:
    """One named tensor of a request or response (``data.shape`` is the tensor's shape)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict[str, ParamValue] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return [int(s) for s in self.data.shape]


@dataclass
class InferRequest:
    """A parsed ``ModelInferRequest``."""

    model_name: str
    inputs: list[InferTensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # requested output names; empty means all


@dataclass
class InferResponse:
    """A ``ModelInferResponse`` before encoding (outputs travel in ``raw_output_contents``)."""

    model_name: str
    outputs: list[InferTensor]
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class TensorMetadata:
    """Name, datatype and shape (``-1`` for a variable dimension) of a model input or output."""

    name: str
    datatype: str
    shape: list[int]


@dataclass
class ModelMetadata:
    """What ``ModelMetadata`` answers."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass
class ServerMetadata:
    """What ``ServerMetadata`` answers."""

    name: str
    version: str
    extensions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- parameters


def parameter_value(name: str, param: pb.InferParameter) -> ParamValue:
    """The Python value of one ``InferParameter`` (bool, int, float or str)."""
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidInput(f"parameter {name!r} has no value set")
    return getattr(param, which)


def parameters_to_dict(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """A protobuf ``map<string, InferParameter>`` -> plain dict."""
    return {key: parameter_value(key, params[key]) for key in sorted(params)}


def set_parameter(param: pb.InferParameter, name: str, value: Any) -> None:
    """Fill one ``InferParameter`` from a Python scalar (numpy scalars accepted)."""
    if isinstance(value, bool | np.bool_):
        param.bool_param = bool(value)
    elif isinstance(value, int | np.integer):
        v = int(value)
        if _INT64_MIN <= v <= _INT64_MAX:
            param.int64_param = v
        elif 0 <= v <= _UINT64_MAX:
            param.uint64_param = v
        else:
            raise InvalidInput(f"parameter {name!r} = {v} does not fit in 64 bits")
    elif isinstance(value, float | np.floating):
        param.double_param = float(value)
    elif isinstance(value, str):
        param.string_param = value
    else:
        raise InvalidInput(f"parameter {name!r} has unsupported type {type(value).__name__} "
                           "(use bool, int, float or str)")


def dict_to_parameters(values: Mapping[str, Any], target: Any) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` (``target``) from a dict of scalars."""
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"parameter names must be non-empty strings, got {key!r}")
        set_parameter(target[key], key, value)


# ------------------------------------------------------------------------------------------------ tensors


def datatype_info(datatype: str, where: str) -> _DataType:
    """The numpy dtype and contents field of an OIP datatype; InvalidInput when unsupported."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise InvalidInput(f"{where} has unsupported datatype {datatype!r} (supported: {known})") from None


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of a numpy array's dtype."""
    for name, info in DATATYPES.items():
        if np.dtype(array.dtype).newbyteorder("<") == info.dtype.newbyteorder("<"):
            return name
    raise InvalidInput(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype here")


MAX_DIM_SIZE = 1 << 31
"""Largest size of one dimension (no real tensor needs more; bigger ones could overflow numpy)."""


def check_shape(shape: Sequence[int], where: str) -> tuple[list[int], int]:
    """Validate a tensor shape (non-negative dims, at most MAX_DIMS); returns (shape, element count)."""
    dims = [int(d) for d in shape]
    if len(dims) > MAX_DIMS:
        raise InvalidInput(f"{where} has {len(dims)} dimensions; at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in dims):
        raise InvalidInput(f"{where} has a negative dimension in shape {dims}")
    if any(d > MAX_DIM_SIZE for d in dims):
        raise InvalidInput(f"{where} has a dimension above {MAX_DIM_SIZE} in shape {dims}")
    if math.prod(d for d in dims if d) > MAX_DIM_SIZE:  # also when a zero makes it empty: numpy cannot shape it
        raise InvalidInput(f"{where} shape {dims} is too large (more than {MAX_DIM_SIZE} elements apart from "
                           f"zero-size dimensions)")
    return dims, math.prod(dims)


def array_from_raw(raw: bytes, datatype: str, shape: Sequence[int], where: str) -> np.ndarray:
    """Decode little-endian raw tensor bytes; the length must match shape x datatype exactly."""
    info = datatype_info(datatype, where)
    dims, numel = check_shape(shape, where)
    expected = numel * info.dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "oversized"
        raise InvalidInput(f"{where}: {kind} raw contents, {len(raw)} bytes, but shape {dims} of {datatype} "
                           f"needs {expected}")
    if datatype == "BOOL":
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if as_bytes.size and as_bytes.max() > 1:
            raise InvalidInput(f"{where}: BOOL raw contents must hold only bytes 0 and 1")
        return as_bytes.view(np.bool_).reshape(dims)
    return np.frombuffer(raw, dtype=info.dtype).reshape(dims)


def array_from_contents(contents: pb.InferTensorContents, datatype: str, shape: Sequence[int],
                        where: str) -> np.ndarray:
    """Decode typed ``InferTensorContents``: exactly the datatype's field, with one value per element."""
    info = datatype_info(datatype, where)
    dims, numel = check_shape(shape, where)
    if info.contents_field is None:
        raise InvalidInput(f"{where}: datatype {datatype} can only travel in raw contents")
    others = [f for f in _CONTENTS_FIELDS if f != info.contents_field and len(getattr(contents, f))]
    if others:
        raise InvalidInput(f"{where}: datatype {datatype} takes {info.contents_field}, but "
                           f"{', '.join(others)} is set")
    values = getattr(contents, info.contents_field)
    if len(values) != numel:
        raise InvalidInput(f"{where}: {len(values)} values in {info.contents_field}, but shape {dims} has "
                           f"{numel} elements")
    if info.dtype.kind in "iu":
        wide = np.fromiter(values, dtype=np.int64 if info.dtype.kind == "i" else np.uint64, count=numel)
        limits = np.iinfo(info.dtype)
        if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
            raise InvalidInput(f"{where}: a value lies outside the range of {datatype}")
        return wide.astype(info.dtype).reshape(dims)
    return np.array(values, dtype=info.dtype).reshape(dims)


def _has_contents(contents: pb.InferTensorContents) -> bool:
    return any(len(getattr(contents, f)) for f in _CONTENTS_FIELDS)


def _tensors_from_proto(tensors: Sequence[Any], raw: Sequence[bytes], kind: str) -> list[InferTensor]:
    """Shared by requests (inputs) and responses (outputs): decode every tensor, raw or typed."""
    if raw and len(raw) != len(tensors):
        raise InvalidInput(f"raw_{kind}_contents has {len(raw)} entries but there are {len(tensors)} "
                           f"{kind}s; send one per tensor or none")
    seen: set[str] = set()
    out = []
    for i, t in enumerate(tensors):
        where = f"{kind} {t.name!r}" if t.name else f"{kind} #{i}"
        if not t.name:
            raise InvalidInput(f"{where} has no name")
        if t.name in seen:
            raise InvalidInput(f"{where} appears more than once")
        seen.add(t.name)
        if raw:
            if t.HasField("contents") and _has_contents(t.contents):
                raise InvalidInput(f"{where} has both typed contents and raw_{kind}_contents; use one")
            data = array_from_raw(raw[i], t.datatype, t.shape, where)
        else:
            data = array_from_contents(t.contents, t.datatype, t.shape, where)
        out.append(InferTensor(name=t.name, datatype=t.datatype, data=data,
                               parameters=parameters_to_dict(t.parameters)))
    return out


def _array_to_raw(tensor: InferTensor, where: str) -> bytes:
    info = datatype_info(tensor.datatype, where)
    return np.ascontiguousarray(tensor.data, dtype=info.dtype).tobytes()


def _fill_contents(contents: pb.InferTensorContents, tensor: InferTensor, where: str) -> None:
    info = datatype_info(tensor.datatype, where)
    if info.contents_field is None:
        raise InvalidInput(f"{where}: datatype {tensor.datatype} can only travel in raw contents")
    getattr(contents, info.contents_field).extend(np.asarray(tensor.data, dtype=info.dtype).ravel().tolist())


# ------------------------------------------------------------------------------------------------ messages


def request_from_proto(msg: pb.ModelInferRequest) -> InferRequest:
    """Parse and validate a ``ModelInferRequest`` (tensors from raw or typed contents)."""
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=parameters_to_dict(msg.parameters),
        inputs=_tensors_from_proto(msg.inputs, msg.raw_input_contents, "input"),
        outputs=[o.name for o in msg.outputs],
    )


def request_to_proto(req: InferRequest, raw: bool = True) -> pb.ModelInferRequest:
    """Encode an :class:`InferRequest`; tensors go to ``raw_input_contents`` unless ``raw`` is False."""
    msg = pb.ModelInferRequest(model_name=req.model_name, model_version=req.model_version, id=req.id)
    dict_to_parameters(req.parameters, msg.parameters)
    for t in req.inputs:
        where = f"input {t.name!r}"
        inp = msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        dict_to_parameters(t.parameters, inp.parameters)
        if raw:
            msg.raw_input_contents.append(_array_to_raw(t, where))
        else:
            _fill_contents(inp.contents, t, where)
    for name in req.outputs:
        msg.outputs.add(name=name)
    return msg


def response_to_proto(resp: InferResponse) -> pb.ModelInferResponse:
    """Encode an :class:`InferResponse` with every output in ``raw_output_contents``."""
    msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id)
    dict_to_parameters(resp.parameters, msg.parameters)
    for t in resp.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        dict_to_parameters(t.parameters, out.parameters)
        msg.raw_output_contents.append(_array_to_raw(t, f"output {t.name!r}"))
    return msg


def response_from_proto(msg: pb.ModelInferResponse) -> InferResponse:
    """Parse a ``ModelInferResponse`` (outputs from raw or typed contents)."""
    return InferResponse(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        parameters=parameters_to_dict(msg.parameters),
        outputs=_tensors_from_proto(msg.outputs, msg.raw_output_contents, "output"),
    )


def model_metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    """Encode :class:`ModelMetadata`."""
    msg = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
    for target, tensors in ((msg.inputs, meta.inputs), (msg.outputs, meta.outputs)):
        for t in tensors:
            target.add(name=t.name, datatype=t.datatype, shape=t.shape)
    return msg


def server_metadata_to_proto(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    """Encode :class:`ServerMetadata`."""
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)


def repository_index_to_proto(entries: Sequence[Any]) -> pb.RepositoryIndexResponse:
    """Encode repository index rows (objects with ``name``, ``version``, ``state``, ``reason``)."""
    msg = pb.RepositoryIndexResponse()
    for e in entries:
        msg.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
    return msg
