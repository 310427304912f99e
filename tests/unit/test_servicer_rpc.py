"""The servicer's one wrapper (``cloud_server.servicer.rpc``): authentication, the status of an error, and
ModelInfer's request metrics, for unary and streaming rpcs alike; on a fake context, without a server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cloud_server.auth import Authenticator
from cloud_server.metrics import ServerMetrics
from cloud_server.servicer import InferenceServicer
from splitinfer.errors import InvalidInput, NotFound, Unavailable
from splitinfer.protocol import grpc_service_pb2 as pb

TOKEN = "t" * 32


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, token: str | None = None):
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self):
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


class FakePlane:
    """What the servicer calls; ``error`` (if set) is raised by every call."""

    draining = False

    def __init__(self, error: Exception | None = None):
        self.error = error
        self.clients: list[str] = []

    def _maybe_fail(self):
        if self.error is not None:
            raise self.error

    def ready(self) -> bool:
        self._maybe_fail()
        return True

    def model_ready(self, name: str, version: str) -> bool:
        self._maybe_fail()
        return True

    async def infer(self, request, client, timeout_s):
        self.clients.append(client)
        self._maybe_fail()
        raise AssertionError("not reached in these tests")


def servicer(plane: FakePlane, tokens: bool = False, metrics: ServerMetrics | None = None) -> InferenceServicer:
    return InferenceServicer(plane, metrics, Authenticator({TOKEN: "device-a"} if tokens else None))


def call(coro):
    return asyncio.run(coro)


def requests_total(metrics: ServerMetrics, code: str) -> float:
    return metrics.registry.get_sample_value("splitinfer_server_requests_total",
                                             {"model": "unknown", "code": code}) or 0.0


def test_unary_rpc_answers_and_maps_a_domain_error_to_its_status():
    s = servicer(FakePlane())
    assert call(s.ServerReady(pb.ServerReadyRequest(), FakeContext())).ready
    for error, code in ((NotFound("no model x"), grpc.StatusCode.NOT_FOUND),
                        (Unavailable("draining"), grpc.StatusCode.UNAVAILABLE),
                        (ZeroDivisionError("secret"), grpc.StatusCode.INTERNAL)):
        with pytest.raises(Aborted) as err:
            call(servicer(FakePlane(error)).ModelReady(pb.ModelReadyRequest(name="x"), FakeContext()))
        assert err.value.code == code
    assert "secret" not in err.value.details  # an unexpected error's details stay in the server log


def test_every_rpc_refuses_a_caller_without_a_valid_token():
    plane = FakePlane()
    s = servicer(plane, tokens=True)
    for rpc, request in ((s.ServerReady, pb.ServerReadyRequest()), (s.ModelInfer, pb.ModelInferRequest()),
                         (s.RepositoryIndex, pb.RepositoryIndexRequest())):
        with pytest.raises(Aborted) as err:
            call(rpc(request, FakeContext(token="wrong")))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert plane.clients == []  # refused before the data plane saw anything

    async def stream():
        return [r async for r in s.ModelStreamInfer(_requests(), FakeContext())]

    with pytest.raises(Aborted) as err:
        call(stream())
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


async def _requests():
    for _ in ():
        yield pb.ModelInferRequest()


def test_the_caller_identity_reaches_the_data_plane_and_model_infer_is_metered():
    plane, metrics = FakePlane(InvalidInput("bad features")), ServerMetrics()
    s = servicer(plane, tokens=True, metrics=metrics)
    with pytest.raises(Aborted) as err:
        call(s.ModelInfer(pb.ModelInferRequest(model_name="m"), FakeContext(token=TOKEN)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.details == "bad features"
    assert plane.clients == ["device-a"]
    assert requests_total(metrics, "INVALID_ARGUMENT") == 1
    with pytest.raises(Aborted):
        call(s.ModelInfer(pb.ModelInferRequest(model_name="m"), FakeContext()))  # no token: counted too
    assert requests_total(metrics, "UNAUTHENTICATED") == 1
    assert metrics.registry.get_sample_value("splitinfer_server_inflight_requests") == 0


def test_a_draining_server_refuses_a_new_stream_with_unavailable():
    plane = FakePlane()
    plane.draining = True

    async def stream():
        return [r async for r in servicer(plane).ModelStreamInfer(_requests(), FakeContext())]

    with pytest.raises(Aborted) as err:
        call(stream())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
