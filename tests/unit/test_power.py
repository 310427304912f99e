"""Measured energy from a (fake) powercap tree: discovery, wrap-around, and the runtime's method label."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import load_bundle
from splitinfer.power import find_meter
from tests.conftest import make_test_bundle
from tests.unit.test_edge_runtime import FakeClient, sample, with_plan


def _domain(root: Path, name: str, uj: int, max_uj: int = 1_000_000, label: str = "package-0") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "name").write_text(f"{label}\n")
    return d


def test_discovery_ignores_subdomains_and_unreadable_ones(tmp_path):
    assert find_meter(tmp_path / "absent") is None
    assert find_meter(tmp_path) is None
    _domain(tmp_path, "intel-rapl:0", 500)
    _domain(tmp_path, "intel-rapl:0:0", 100, label="core")  # a part of package 0: not counted twice
    bad = _domain(tmp_path, "intel-rapl:1", 0, label="package-1")
    (bad / "energy_uj").write_text("garbage")
    meter = find_meter(tmp_path)
    assert meter is not None and [d.name for d in meter.domains] == ["package-0"]
    assert meter.describe() == "RAPL package-0"


def test_energy_between_snapshots_unwraps_the_counter(tmp_path):
    d = _domain(tmp_path, "intel-rapl:0", 999_000)
    meter = find_meter(tmp_path)
    before = meter.read_uj()
    (d / "energy_uj").write_text("4000")  # wrapped past max_energy_range_uj = 1,000,000
    assert meter.joules_between(before, meter.read_uj()) == pytest.approx(0.005)


def test_runtime_reports_measured_compute_energy(tmp_path):
    base_bundle = load_bundle(make_test_bundle(tmp_path / "b"))
    d = _domain(tmp_path / "powercap", "intel-rapl:0", 0)
    meter = find_meter(tmp_path / "powercap")
    bundle = with_plan(base_bundle, (0.0, 0.0))  # the first exit answers: no radio
    settings = EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False)
    rt = EdgeRuntime(bundle, FakeClient(bundle), settings, metrics=EdgeMetrics(), meter=meter)

    class Ticking:
        """A counter that advances 2.5 mJ per read, as if the package burned energy during the request."""

        def __init__(self):
            self.value = 0

        def __call__(self):
            self.value += 2500
            (d / "energy_uj").write_text(str(self.value))

    tick = Ticking()
    original = meter.read_uj

    def read_uj():
        tick()
        return original()

    meter.read_uj = read_uj
    try:
        res = rt.infer(sample(), "r")
    finally:
        rt.close()
    assert res.energy_j["compute"] == pytest.approx(0.0025)
    get = rt.metrics.registry.get_sample_value
    assert get("splitinfer_edge_energy_joules_total", {"component": "compute", "method": "rapl"}) == \
        pytest.approx(0.0025)
    assert rt.status()["device"]["energy_method"].startswith("rapl")
