"""schemathesis against the edge agent's OpenAPI document: requests generated from every documented
operation (multipart uploads of arbitrary bytes included) never get a 5xx answer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from edge_agent.app import create_app
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import load_bundle
from tests.support.bundles import make_test_bundle
from tests.support.fakes import FakeClient

pytestmark = pytest.mark.slow  # fuzzing every operation (about 25 s)

schemathesis = pytest.importorskip("schemathesis")
EXAMPLES = 150


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    path = make_test_bundle(tmp_path_factory.mktemp("fuzz") / "b")
    bundle = load_bundle(path)
    cfg = EdgeSettings(bundle=path, server="127.0.0.1:1", adaptive=False, max_upload_bytes=256 * 1024)
    runtime = EdgeRuntime(bundle, FakeClient(bundle), cfg, metrics=EdgeMetrics())
    app = create_app(cfg, runtime)
    with TestClient(app):  # runs the lifespan: the agent is ready while the fuzzer calls it
        yield app, runtime
    runtime.close()


def test_no_operation_answers_5xx(agent):
    app, runtime = agent
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = sorted(f"{op.method.upper()} {op.path}" for op in operations)
    assert "POST /v1/infer" in labels and "GET /v1/status" in labels
    calls: dict[str, int] = {}
    statuses: dict[str, set[int]] = {}

    def checker(op, label):
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            response = case.call()
            calls[label] = calls.get(label, 0) + 1
            statuses.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (label, response.status_code, response.text[:300])

        return check

    for op in operations:
        checker(op, f"{op.method.upper()} {op.path}")()
    assert calls["POST /v1/infer"] >= 100, calls
    assert statuses["POST /v1/infer"] & {400, 413, 415, 422}, statuses  # garbage uploads are refused with 4xx
    with TestClient(app) as client:  # and the agent still serves
        assert client.get("/healthz").status_code == 200
