"""Unit test of the server's queue-depth gauge over several versions of one model (cloud_server.metrics)."""

from __future__ import annotations

from cloud_server.metrics import ServerMetrics


def depth(metrics: ServerMetrics, model: str) -> float:
    return metrics.registry.get_sample_value("splitinfer_server_queue_depth", {"model": model})


def test_queue_depth_sums_the_versions_of_a_model():
    metrics = ServerMetrics()
    metrics.add_model("m")
    metrics.add_model("other")
    v1, v2 = metrics.queue_depth_reporter("m", "1"), metrics.queue_depth_reporter("m", "2")
    other = metrics.queue_depth_reporter("other", "1")
    v1(3)
    v2(4)
    other(5)
    assert depth(metrics, "m") == 7  # one version's report no longer hides the other's queue
    v1(0)
    assert depth(metrics, "m") == 4
    v2(0)
    assert depth(metrics, "m") == 0
    assert depth(metrics, "other") == 5
