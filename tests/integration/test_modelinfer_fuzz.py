"""Hypothesis fuzz of ``ModelInfer`` and ``ModelStreamInfer`` against one real cloud server process.

Every generated request must get a status: OK, or a refusal the wire contract documents (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE) — never INTERNAL or UNKNOWN, never a crash or a hang. Afterwards
the server is still SERVING, still answers a valid request correctly, and its log holds no unexpected error.

Request strategies (our generated stubs, ``splitinfer.protocol.grpc_service_pb2``):

* ``arbitrary_requests``: any model name / version, 0-3 inputs with any name, datatype and shape (negative,
  huge, empty, too many dimensions), raw contents that match the declared size or not (or are missing),
  typed contents in any field, any parameters (split, codec, codec.* as any type) and requested outputs;
* ``split_requests``: well-formed ``features`` requests at a random split with a real or junk codec, a
  ``codec.shape`` that fits the boundary or not, and a random payload of a plausible size;
* ``mutated_requests``: a valid request (features encoded by ``uint8-affine``, or an ``input`` tensor) with
  0-3 mutations (bytes overwritten, payload truncated or extended, non-finite ranges, parameters replaced or
  dropped, datatype / shape / name / model changed). Without mutations it must answer OK with the right
  logits; with only value-bytes overwritten it must answer OK; with its payload length changed, never OK.

Three runs: 1,000 sequential ModelInfer calls, 50 groups of 2-8 concurrent calls (batched together by the
server: a bad request must fail alone), and 100 requests over one ModelStreamInfer stream (exactly one answer
each, matched by id; the stream stays open). Examples are derandomized, so every run sends the same requests.
"""

from __future__ import annotations

import math
import queue
import re
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer import wire
from splitinfer.bundle import load_bundle
from splitinfer.codec import get_codec
from splitinfer.protocol import grpc_service_pb2 as pb
from splitinfer.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.support.servers import MAX_BATCH, ServerProcess, free_port, grpc_health_status, start_server

pytestmark = pytest.mark.slow  # fuzzing a live server (about 25 s)

MODEL = "default"
SPLIT = 9
CODEC = "uint8-affine"
UNARY_EXAMPLES = 1000
STREAM_EXAMPLES = 100
CONCURRENT_EXAMPLES = 50
CALL_TIMEOUT_S = 10.0
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------------------------ constants

OIP_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                 "FP32", "FP64", "BF16", "BYTES"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
            "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
CONTENTS_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                   "fp32_contents", "fp64_contents", "bytes_contents"]
CONTENTS_OF = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
               "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
               "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
CODEC_NAMES = ["uint8-affine", "float32", "float16", "bottleneck", "", "zstd", "UINT8-AFFINE"]
HUGE = [2**20, 2**30, 2**31 - 1, 2**31, 2**31 + 1, 2**32, 2**40, 2**62, 2**63 - 1]  # MAX_DIM_SIZE is 2**31
MAX_GENERATED_BYTES = 64 * 1024  # above this, "matching" raw contents fall back to random short bytes


# ------------------------------------------------------------------------------------------------- helpers


def rng_bytes(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def numel_of(shape: list[int]) -> int | None:
    """Element count of a declared shape, or None when a dimension is negative."""
    return None if any(d < 0 for d in shape) else math.prod(shape)


def typed_values(field_name: str, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    if field_name == "bool_contents":
        return rng.integers(0, 2, n).astype(bool).tolist()
    if field_name == "int_contents":
        return rng.integers(-(2**31), 2**31, n).tolist()
    if field_name == "int64_contents":
        return rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64).tolist()
    if field_name == "uint_contents":
        return rng.integers(0, 2**32, n).tolist()
    if field_name == "uint64_contents":
        return rng.integers(0, 2**64 - 1, n, dtype=np.uint64).tolist()
    if field_name in ("fp32_contents", "fp64_contents"):
        values = rng.standard_normal(n)
        if n and rng.random() < 0.2:
            values[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf, 1e300])
        if field_name == "fp32_contents":
            values = np.clip(values, -3.4e38, 3.4e38)
        return values.tolist()
    return [rng.bytes(int(rng.integers(0, 8))) for _ in range(n)]


def set_param(param: pb.InferParameter, kind: str, value) -> None:
    if kind == "unset":
        param.Clear()
    else:
        setattr(param, f"{kind}_param", value)


def describe(req: pb.ModelInferRequest) -> str:
    """A readable, bounded rendering of a request for failure messages."""
    short = pb.ModelInferRequest()
    short.CopyFrom(req)
    del short.raw_input_contents[:]
    raws = [f"{len(r)} bytes {r[:24].hex()}..." for r in req.raw_input_contents]
    for t in short.inputs:
        for name in CONTENTS_FIELDS:
            values = getattr(t.contents, name)
            if len(values) > 8:
                kept = list(values[:8])
                del values[:]
                values.extend(kept)
    text = text_format.MessageToString(short, as_utf8=True)
    return f"{text[:3000]}raw_input_contents: {raws}"


# ----------------------------------------------------------------------------------------------- strategies

def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of ``choices``, each picked with its weight (``st.one_of`` weighs branches equally)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


names = weighted((4, st.sampled_from([wire.FEATURES_TENSOR, wire.INPUT_TENSOR])), (1, st.text(max_size=12)))
datatypes = weighted((5, st.sampled_from(OIP_DATATYPES)), (1, st.text(max_size=8)))
dims = st.one_of(st.integers(0, 8), st.sampled_from([1, 2, 4, 5, 7, 28, 96, 784, 9408]), st.integers(-3, -1),
                 st.sampled_from([-(2**63), *HUGE]))
shapes = st.one_of(
    st.lists(dims, max_size=5),
    st.lists(dims, min_size=15, max_size=18),  # around MAX_DIMS (16)
    st.lists(st.sampled_from([0, 1, 2, *HUGE]), min_size=1, max_size=5),
    # zero elements, but the other dimensions (each allowed) multiply past what numpy can address
    st.tuples(st.lists(st.sampled_from([2**30, 2**31 - 1, 2**31, 2**31 + 1]), min_size=1, max_size=4),
              st.integers(0, 4)).map(lambda t: [*t[0][: t[1]], 0, *t[0][t[1]:]]),
    st.sampled_from([[1, 1, 28, 28], [2, 1, 28, 28], [MAX_BATCH + 1, 1, 28, 28], [0, 1, 28, 28], [1, 28, 28],
                     [2, 1, 28, 27]]),
)
shape_texts = st.one_of(
    st.sampled_from(["1,96,7,7", "2,96,7,7", f"{MAX_BATCH},96,7,7", f"{MAX_BATCH + 1},96,7,7", "0,96,7,7",
                     "-1,96,7,7", "1,96,7", "1,48,14,14", "1,96", "99999999,96,7,7", "1,96,7,7,", ",", "",
                     "1,1,1,1,1,1,1,1,1", "1e3,96,7,7", " 1,96,7,7", "1,96,7,7\x00", str(2**70) + ",96,7,7",
                     "4294967297,96,7,7"]),
    st.lists(st.integers(-2, 2**40), min_size=1, max_size=9).map(lambda d: ",".join(map(str, d))),
    st.text(max_size=16),
)
param_values = weighted(
    (3, st.tuples(st.just("int64"), st.one_of(st.integers(-2, 20), st.sampled_from([-(2**63), 2**31, 2**63 - 1])))),
    (1, st.tuples(st.just("uint64"), st.one_of(st.integers(0, 20), st.sampled_from([2**63, 2**64 - 1])))),
    (1, st.tuples(st.just("bool"), st.booleans())),
    (1, st.tuples(st.just("double"), st.one_of(st.floats(), st.sampled_from([9.0, 9.5])))),
    (4, st.tuples(st.just("string"), st.one_of(st.sampled_from(CODEC_NAMES + ["9", "channel", "tensor", "1"]),
                                               shape_texts))),
    (1, st.tuples(st.just("unset"), st.none())),  # an InferParameter with no value
)
param_keys = st.one_of(
    st.sampled_from([wire.PARAM_SPLIT, wire.PARAM_CODEC, "codec.shape", "codec.granularity", "codec.v",
                     "codec.bits", "codec.", "sequence_id", "priority", "timeout", ""]),
    st.text(max_size=10),
)
parameters = st.dictionaries(param_keys, param_values, max_size=5)


@st.composite
def raw_contents(draw, shape: list[int], datatype: str) -> bytes:
    """Raw bytes for a declared shape: matching its size, off by a little, random or empty."""
    numel = numel_of(shape)
    size = None
    if numel is not None and datatype in ITEMSIZE and numel * ITEMSIZE[datatype] <= MAX_GENERATED_BYTES:
        size = numel * ITEMSIZE[datatype]
    kind = draw(st.sampled_from(["match", "match", "off", "random", "empty"]))
    seed = draw(st.integers(0, 2**32 - 1))
    if kind == "match" and size is not None:
        data = rng_bytes(seed, size)
        if datatype == "BOOL" and draw(st.booleans()):
            data = bytes(b & 1 for b in data)
        if datatype in ("FP32", "FP16", "FP64", "BF16") and draw(st.booleans()):  # finite, normal values
            arr = np.random.default_rng(seed).standard_normal(size // ITEMSIZE[datatype])
            data = arr.astype({"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "BF16": "<f2"}[datatype]).tobytes()
        return data
    if kind == "off" and size is not None:
        return rng_bytes(seed, max(0, size + draw(st.sampled_from([-1, 1, -ITEMSIZE[datatype], 7]))))
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=64))


@st.composite
def typed_contents(draw, tensor: pb.ModelInferRequest.InferInputTensor) -> None:
    """Fill ``tensor.contents``: usually the datatype's field with the right count, sometimes anything."""
    field_name = CONTENTS_OF.get(tensor.datatype)
    if field_name is None or draw(st.integers(0, 4)) == 0:
        field_name = draw(st.sampled_from(CONTENTS_FIELDS))
    numel = numel_of(list(tensor.shape))
    use_numel = numel is not None and numel <= 4096 and draw(st.integers(0, 3)) > 0
    n = numel if use_numel else draw(st.integers(0, 16))
    getattr(tensor.contents, field_name).extend(typed_values(field_name, n, draw(st.integers(0, 2**32 - 1))))
    if draw(st.integers(0, 9)) == 0:  # a second field set as well
        other = draw(st.sampled_from(CONTENTS_FIELDS))
        getattr(tensor.contents, other).extend(typed_values(other, 1, 0))


def fill_parameters(target, params: dict) -> None:
    for key, (kind, value) in params.items():
        set_param(target[key], kind, value)


@st.composite
def arbitrary_requests(draw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from([MODEL, MODEL, "", wire.PROBE_MODEL]), st.text(max_size=20))),
        model_version=draw(st.one_of(st.sampled_from(["", "", "1", "2", "0", "-1", "01"]), st.text(max_size=8))),
        id=draw(st.text(max_size=16)),
    )
    fill_parameters(req.parameters, draw(parameters))
    mode = draw(st.sampled_from(["raw", "raw", "typed", "none", "both"]))
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(shapes))
        if draw(st.integers(0, 5)) == 0:
            fill_parameters(t.parameters, draw(parameters))
        if mode in ("raw", "both"):
            req.raw_input_contents.append(draw(raw_contents(list(t.shape), t.datatype)))
        if mode == "typed" or (mode == "both" and draw(st.booleans())):
            draw(typed_contents(t))
    if mode in ("raw", "both") and draw(st.integers(0, 7)) == 0:  # one raw entry too many or too few
        if req.raw_input_contents and draw(st.booleans()):
            del req.raw_input_contents[-1]
        else:
            req.raw_input_contents.append(draw(st.binary(max_size=16)))
    for name in draw(st.lists(st.one_of(st.just(wire.OUTPUT_TENSOR), st.text(max_size=8)), max_size=3)):
        out = req.outputs.add(name=name)
        if draw(st.integers(0, 4)) == 0:
            fill_parameters(out.parameters, draw(parameters))
    return req


@dataclass
class Expect:
    """What a generated request must get: ``ok`` True (must be OK), False (must not be OK), None (either)."""

    ok: bool | None = None
    logits: np.ndarray | None = None  # exact expected logits when ok is True and known
    ops: list = field(default_factory=list)


@st.composite
def split_requests(draw, boundaries: list[list[int]]) -> tuple[pb.ModelInferRequest, Expect]:
    """Well-formed features requests at a random split, with a random payload of a plausible size."""
    split = draw(st.one_of(st.integers(0, len(boundaries) - 1), st.integers(-2, len(boundaries) + 2)))
    codec = draw(st.one_of(st.sampled_from(["uint8-affine", "uint8-affine", "float32", "float16", "bottleneck"]),
                           st.text(max_size=8)))
    batch = draw(st.integers(0, MAX_BATCH + 1))
    per_sample = boundaries[split] if 0 <= split < len(boundaries) else [96, 7, 7]
    shape = [batch, *per_sample]
    if draw(st.integers(0, 4)) == 0:
        shape = draw(st.sampled_from([[1, 96, 7, 7], [1, 48, 14, 14], [2, *per_sample[:-1]], [1]]))
    numel = math.prod(shape)
    granularity = draw(st.sampled_from(["channel", "tensor", "channel", "bogus", None]))
    groups = shape[1] if granularity in ("channel", None) and len(shape) > 1 else 1
    sizes = [8 * groups + numel, 4 * numel, 8 * groups + numel - 1, 8 * shape[1] + numel if len(shape) > 1 else 0,
             8 + numel, 0]
    size = draw(st.sampled_from(sizes))
    seed = draw(st.integers(0, 2**32 - 1))
    payload = bytearray(rng_bytes(seed, size))
    sane = False  # the random payload decodes to finite, moderate values
    if codec == "uint8-affine" and size >= 8 * groups and draw(st.booleans()):
        rng = np.random.default_rng(seed)
        payload[: 4 * groups] = rng.uniform(-3, 0, groups).astype("<f4").tobytes()
        payload[4 * groups: 8 * groups] = rng.uniform(0, 0.05, groups).astype("<f4").tobytes()
        sane = True
    if codec == "float32" and size == 4 * numel and draw(st.booleans()):
        payload = bytearray(np.random.default_rng(seed).standard_normal(numel).astype("<f4").tobytes())
        sane = True
    req = pb.ModelInferRequest(model_name=MODEL)
    req.parameters[wire.PARAM_SPLIT].int64_param = split
    req.parameters[wire.PARAM_CODEC].string_param = codec
    if draw(st.integers(0, 5)) > 0:
        req.parameters["codec.shape"].string_param = ",".join(map(str, shape))
    if granularity is not None:
        req.parameters["codec.granularity"].string_param = granularity
    req.inputs.add(name=wire.FEATURES_TENSOR, datatype="UINT8", shape=[len(payload)])
    req.raw_input_contents.append(bytes(payload))
    well_formed = (0 <= split < len(boundaries) and 1 <= batch <= MAX_BATCH and shape == [batch, *per_sample]
                   and "codec.shape" in req.parameters and sane)
    if well_formed and codec == "uint8-affine" and granularity != "bogus" and size == 8 * groups + numel:
        return req, Expect(ok=True)
    if well_formed and codec == "float32" and size == 4 * numel:
        return req, Expect(ok=True)
    return req, Expect()


@dataclass
class Base:
    """A valid request and its exact answer (from the same server before fuzzing)."""

    request: pb.ModelInferRequest
    logits: np.ndarray
    groups: int = 0  # uint8-affine range groups (features requests): value bytes start at 8 * groups


SPECIAL_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e38, 3.4e38, -3.4e38, 1e-45, 1e-38]


@st.composite
def mutated_requests(draw, bases: list[Base]) -> tuple[pb.ModelInferRequest, Expect]:
    base = draw(st.sampled_from(bases))
    req = pb.ModelInferRequest()
    req.CopyFrom(base.request)
    tensor = req.inputs[0]
    payload = bytearray(req.raw_input_contents[0])
    original_len = len(payload)
    ops = []
    kinds = ["set_byte", "set_byte", "truncate", "extend", "special", "param", "drop_param", "datatype", "shape",
             "name", "model"]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "set_byte" and payload:
            pos = draw(st.integers(0, len(payload) - 1))
            payload[pos] = draw(st.integers(0, 255))
            ops.append((kind, pos))
        elif kind == "truncate":
            n = draw(st.integers(0, len(payload)))
            payload = payload[:n]
            ops.append((kind, n, draw(st.booleans())))
        elif kind == "extend":
            payload += draw(st.binary(min_size=1, max_size=32))
            ops.append((kind, len(payload), draw(st.booleans())))
        elif kind == "special" and len(payload) >= 4:
            pos = 4 * draw(st.integers(0, min(len(payload) // 4, 2 * base.groups + 1) - 1))
            payload[pos: pos + 4] = struct.pack("<f", draw(st.sampled_from(SPECIAL_FLOATS)))
            ops.append((kind, pos))
        elif kind == "param":
            key = draw(st.sampled_from([wire.PARAM_SPLIT, wire.PARAM_CODEC, "codec.shape", "codec.granularity",
                                        "codec.v"]))
            kind_value = draw(param_values)
            set_param(req.parameters[key], *kind_value)
            ops.append((kind, key, kind_value))
        elif kind == "drop_param" and req.parameters:
            key = draw(st.sampled_from(sorted(req.parameters)))
            del req.parameters[key]
            ops.append((kind, key))
        elif kind == "datatype":
            tensor.datatype = draw(datatypes)
            ops.append((kind, tensor.datatype))
        elif kind == "shape":
            del tensor.shape[:]
            tensor.shape.extend(draw(shapes))
            ops.append((kind, list(tensor.shape)))
        elif kind == "name":
            tensor.name = draw(names)
            ops.append((kind, tensor.name))
        elif kind == "model":
            req.model_name = draw(st.one_of(st.just(""), st.text(max_size=8)))
            ops.append((kind, req.model_name))
    for op in ops:  # a length change with the declared shape fixed: the codec, not the converter, must refuse
        if op[0] in ("truncate", "extend") and op[2] and tensor.name == wire.FEATURES_TENSOR:
            del tensor.shape[:]
            tensor.shape.append(len(payload))
    req.raw_input_contents[0] = bytes(payload)
    if not ops:
        return req, Expect(ok=True, logits=base.logits, ops=ops)
    if base.groups and all(op[0] == "set_byte" and op[1] >= 8 * base.groups for op in ops):
        return req, Expect(ok=True, ops=ops)  # only quantized values changed: still a valid payload
    resized = len(payload) != original_len
    if resized and all(op[0] in ("set_byte", "special", "truncate", "extend", "model") for op in ops):
        return req, Expect(ok=False, ops=ops)
    return req, Expect(ops=ops)


@st.composite
def input_requests(draw) -> tuple[pb.ModelInferRequest, Expect]:
    """Cloud-only ``input`` requests: random batch and values (sometimes non-finite), raw or typed."""
    batch = draw(st.integers(0, MAX_BATCH + 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, 1, 28, 28)) * draw(st.sampled_from([1.0, 1e3, 1e30]))).astype(np.float32)
    if x.size and draw(st.integers(0, 4)) == 0:
        x.flat[int(rng.integers(0, x.size))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    req = pb.ModelInferRequest(model_name=MODEL, model_version=draw(st.sampled_from(["", "1"])))
    t = req.inputs.add(name=wire.INPUT_TENSOR, datatype="FP32", shape=list(x.shape))
    if draw(st.booleans()):
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    if draw(st.booleans()):
        req.outputs.add(name=wire.OUTPUT_TENSOR)
    ok = 1 <= batch <= MAX_BATCH and bool(np.isfinite(x).all())
    return req, Expect(ok=ok)


def any_request(boundaries: list[list[int]], bases: list[Base]):
    return st.one_of(
        arbitrary_requests().map(lambda r: (r, Expect())),
        arbitrary_requests().map(lambda r: (r, Expect())),
        split_requests(boundaries),
        mutated_requests(bases),
        mutated_requests(bases),
        input_requests(),
    )


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(bundle_dir, free_port(), free_port(), tmp_path_factory.mktemp("fuzz") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def boundaries(bundle) -> list[list[int]]:
    return [list(b.shape) for b in bundle.staged.boundaries[: bundle.staged.num_stages]]


def features_request(payload: bytes, meta: dict) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.parameters[wire.PARAM_SPLIT].int64_param = SPLIT
    req.parameters[wire.PARAM_CODEC].string_param = CODEC
    for k, v in meta.items():
        req.parameters[wire.CODEC_META_PREFIX + k].string_param = str(v)
    req.inputs.add(name=wire.FEATURES_TENSOR, datatype="UINT8", shape=[len(payload)])
    req.raw_input_contents.append(payload)
    return req


@pytest.fixture(scope="module")
def bases(bundle, stub) -> list[Base]:
    """Valid features (batch 1 and 2) and input requests, with the logits the server answers for them."""
    rng = np.random.default_rng(3)
    out = []
    for batch in (1, 2):
        x = torch.from_numpy(rng.standard_normal((batch, *bundle.plan.input.shape)).astype(np.float32))
        with torch.inference_mode():
            head = bundle.staged.run(x, 0, SPLIT)
            payload, meta = get_codec(CODEC).encode(head)
            decoded = get_codec(CODEC).decode(payload, meta)
            tail = bundle.staged.run(decoded, SPLIT, bundle.staged.num_stages).numpy()
            full = bundle.staged.run(x, 0, bundle.staged.num_stages).numpy()
        groups = head.shape[1] if meta["granularity"] == "channel" else 1
        req = features_request(payload, meta)
        np.testing.assert_allclose(logits_of(stub.ModelInfer(req, timeout=CALL_TIMEOUT_S)), tail, atol=1e-5)
        out.append(Base(req, tail, groups))
        inp = pb.ModelInferRequest(model_name=MODEL)
        inp.inputs.add(name=wire.INPUT_TENSOR, datatype="FP32", shape=list(x.shape))
        inp.raw_input_contents.append(x.numpy().astype("<f4").tobytes())
        np.testing.assert_allclose(logits_of(stub.ModelInfer(inp, timeout=CALL_TIMEOUT_S)), full, atol=1e-5)
        out.append(Base(inp, full, 0))
    return out


def logits_of(resp: pb.ModelInferResponse) -> np.ndarray:
    (out,) = resp.outputs
    assert out.name == wire.OUTPUT_TENSOR and out.datatype == "FP32", out
    shape = [int(d) for d in out.shape]
    assert len(shape) == 2 and shape[1] == 10 and 1 <= shape[0] <= MAX_BATCH, shape
    return np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(shape)


@dataclass
class Tally:
    calls: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    nonfinite_ok: int = 0

    def add(self, code: str) -> None:
        self.calls += 1
        self.codes[code] = self.codes.get(code, 0) + 1


TALLY = {"unary": Tally(), "stream": Tally(), "concurrent": Tally()}


def check_answer(code: grpc.StatusCode, details: str, resp: pb.ModelInferResponse | None,
                 req: pb.ModelInferRequest, expect: Expect, tally: Tally) -> None:
    tally.add(code.name)
    assert code in ALLOWED, f"status {code.name}: {details}\nrequest:\n{describe(req)}\nops: {expect.ops}"
    if code != grpc.StatusCode.OK:
        assert details, f"{code.name} without a message\nrequest:\n{describe(req)}"
        assert expect.ok is not True, (f"a valid request was refused: {code.name}: {details}\n"
                                       f"request:\n{describe(req)}\nops: {expect.ops}")
        return
    assert expect.ok is not False, f"a malformed request answered OK\nrequest:\n{describe(req)}\nops: {expect.ops}"
    if req.model_name == wire.PROBE_MODEL:  # a link probe: answered OK with no outputs, whatever it carries
        assert resp is not None and not resp.outputs and not resp.raw_output_contents, resp
        return
    logits = logits_of(resp)
    if expect.logits is not None:
        np.testing.assert_allclose(logits, expect.logits, atol=1e-5)
    if not np.isfinite(logits).all():
        tally.nonfinite_ok += 1


# ---------------------------------------------------------------------------------------------------- tests


def test_modelinfer_fuzz(server, stub, boundaries, bases):
    tally = TALLY["unary"]

    @settings(max_examples=UNARY_EXAMPLES, **FUZZ_SETTINGS)
    @given(case=any_request(boundaries, bases))
    def check(case):
        req, expect = case
        try:
            resp = stub.ModelInfer(req, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            check_answer(exc.code(), exc.details() or "", None, req, expect, tally)
        else:
            check_answer(grpc.StatusCode.OK, "", resp, req, expect, tally)
        assert server.proc.poll() is None, f"server died ({server.proc.returncode}) on\n{describe(req)}"

    started = time.perf_counter()
    check()
    elapsed = time.perf_counter() - started
    print(f"\nModelInfer fuzz: {tally.calls} calls in {elapsed:.1f} s; codes {tally.codes}; "
          f"OK with non-finite logits: {tally.nonfinite_ok}")
    assert tally.calls >= UNARY_EXAMPLES
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(tally.codes), tally.codes


def test_concurrent_modelinfer_fuzz(server, stub, boundaries, bases):
    """Requests sent together are batched together: a bad one fails alone, the valid ones still answer right."""
    tally = TALLY["concurrent"]

    @settings(max_examples=CONCURRENT_EXAMPLES, **FUZZ_SETTINGS)
    @given(cases=st.lists(any_request(boundaries, bases), min_size=2, max_size=8))
    def check(cases):
        futures = [stub.ModelInfer.future(req, timeout=CALL_TIMEOUT_S) for req, _ in cases]
        for (req, expect), future in zip(cases, futures, strict=True):
            try:
                resp = future.result()
            except grpc.RpcError as exc:
                check_answer(exc.code(), exc.details() or "", None, req, expect, tally)
            else:
                check_answer(grpc.StatusCode.OK, "", resp, req, expect, tally)
        assert server.proc.poll() is None, f"server died ({server.proc.returncode})"

    started = time.perf_counter()
    check()
    print(f"\nconcurrent ModelInfer fuzz: {tally.calls} calls in {time.perf_counter() - started:.1f} s; "
          f"codes {tally.codes}")
    assert tally.calls >= 2 * CONCURRENT_EXAMPLES


class Stream:
    """One open ModelStreamInfer call: requests go in through a queue, answers come out of another."""

    _CLOSE = object()

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub):
        self.requests: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.call = stub.ModelStreamInfer(iter(self.requests.get, self._CLOSE), timeout=600)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for answer in self.call:
                self.answers.put(answer)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def ask(self, req: pb.ModelInferRequest, timeout: float) -> pb.ModelStreamInferResponse:
        self.requests.put(req)
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stream answer within {timeout} s (stream error: {self.error!r}) for\n"
                                 f"{describe(req)}") from None

    def close(self, timeout: float = 30) -> None:
        self.requests.put(self._CLOSE)
        self.reader.join(timeout)


def test_modelstreaminfer_fuzz(server, stub, boundaries, bases):
    tally = TALLY["stream"]
    stream = Stream(stub)
    counter = iter(range(10**9))
    code_re = re.compile(r"^([A-Z_]+): (.+)", re.S)

    @settings(max_examples=STREAM_EXAMPLES, **FUZZ_SETTINGS)
    @given(case=any_request(boundaries, bases))
    def check(case):
        req, expect = case
        req.id = f"fuzz-{next(counter)}"
        answer = stream.ask(req, CALL_TIMEOUT_S)
        assert answer.infer_response.id == req.id, (answer.infer_response.id, req.id)
        if answer.error_message:
            match = code_re.match(answer.error_message)
            assert match, f"stream error without a status code: {answer.error_message!r}"
            check_answer(grpc.StatusCode[match.group(1)], match.group(2), None, req, expect, tally)
        else:
            check_answer(grpc.StatusCode.OK, "", answer.infer_response, req, expect, tally)
        assert stream.error is None, f"stream ended: {stream.error!r}"
        assert server.proc.poll() is None, f"server died ({server.proc.returncode}) on\n{describe(req)}"

    started = time.perf_counter()
    try:
        check()
        # the same stream is still open and serves a valid request
        valid = pb.ModelInferRequest()
        valid.CopyFrom(bases[0].request)
        valid.id = "after-fuzz"
        answer = stream.ask(valid, CALL_TIMEOUT_S)
        assert not answer.error_message, answer.error_message
        np.testing.assert_allclose(logits_of(answer.infer_response), bases[0].logits, atol=1e-5)
    finally:
        stream.close()
    elapsed = time.perf_counter() - started
    print(f"\nModelStreamInfer fuzz: {tally.calls} requests in {elapsed:.1f} s; codes {tally.codes}")
    assert not stream.reader.is_alive(), "the stream did not end after the client closed its side"
    assert stream.error is None, f"stream ended with an error: {stream.error!r}"
    assert stream.answers.empty(), f"extra stream answers: {stream.answers.qsize()}"
    assert tally.calls >= STREAM_EXAMPLES


def test_server_healthy_after_fuzz(server, stub, bases):
    assert server.proc.poll() is None, server.log()[-4000:]
    assert grpc_health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    for base in bases:
        resp = stub.ModelInfer(base.request, timeout=CALL_TIMEOUT_S)
        np.testing.assert_allclose(logits_of(resp), base.logits, atol=1e-5)
    log = server.log()
    assert "unexpected error while serving" not in log, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    # junk model names were counted under one "unknown" label, not one label each
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert labels <= {MODEL, "unknown"}, sorted(labels)[:20]


@pytest.mark.parametrize("shape", [[0, 2**31, 2**31], [2**31, 2**31, 2**31, 0], [0, *[2**31] * 15]])
@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_empty_tensor_with_huge_dimensions_is_invalid_argument(stub, shape, contents):
    """A zero-element tensor whose other dimensions multiply past what numpy can address (found by the fuzz)."""
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name=wire.INPUT_TENSOR, datatype="FP32", shape=shape)
    if contents == "raw":
        req.raw_input_contents.append(b"")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=CALL_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
