"""Measured energy from fake sysfs trees: RAPL (powercap) and INA3221 (hwmon and legacy IIO) discovery, rail
selection, integration, wrap-around, unreadable files, and the runtime's method label."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from splitinfer.bundle import load_bundle
from splitinfer.power import Ina3221Meter, Rail, RaplMeter, find_ina3221, find_meter
from tests.support.bundles import make_test_bundle
from tests.support.fakes import FakeClient, sample, with_plan


def _domain(root: Path, name: str, uj: int, max_uj: int = 1_000_000, label: str = "package-0") -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "name").write_text(f"{label}\n")
    return d


def _no_ina(tmp_path: Path) -> dict:
    """Keep RAPL tests hermetic: no INA3221 lookup in the real /sys."""
    return {"hwmon_root": tmp_path / "no-hwmon", "iio_root": tmp_path / "no-iio", "start": False}


def _hwmon(root: Path, name: str, channels: dict[int, tuple[str | None, float, float]], chip: str = "ina3221",
           in_device: bool = False) -> Path:
    """A hwmon device; ``channels`` maps 1..3 to (label, bus mV, mA)."""
    h = root / name
    d = h / "device" if in_device else h
    d.mkdir(parents=True)
    (d / "name").write_text(f"{chip}\n")
    for ch, (label, mv, ma) in channels.items():
        if label is not None:
            (d / f"in{ch}_label").write_text(f"{label}\n")
        (d / f"in{ch}_input").write_text(f"{mv:g}\n")
        (d / f"curr{ch}_input").write_text(f"{ma:g}\n")
    return d


def _iio(root: Path, bus: str, rails: dict[int, tuple[str, float]], dev: str = "iio:device0") -> Path:
    """A legacy ``ina3221x`` IIO device; ``rails`` maps 0..2 to (rail name, mW)."""
    d = root / bus / dev
    d.mkdir(parents=True)
    for ch, (name, mw) in rails.items():
        (d / f"rail_name_{ch}").write_text(f"{name}\n")
        (d / f"in_power{ch}_input").write_text(f"{mw:g}\n")
    return d


class StepClock:
    """A clock that advances ``step`` seconds each time it is read (the meter reads it once per sample)."""

    def __init__(self, step: float = 1.0, start: float = 0.0) -> None:
        self.t = start - step
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


ORIN = {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 200), 3: ("VDD_SOC", 5000, 300)}


# ----------------------------------------------------------------------------------------------------------- RAPL


def test_discovery_ignores_subdomains_and_unreadable_ones(tmp_path):
    assert find_meter(tmp_path / "absent", **_no_ina(tmp_path)) is None
    assert find_meter(tmp_path, **_no_ina(tmp_path)) is None
    _domain(tmp_path, "intel-rapl:0", 500)
    _domain(tmp_path, "intel-rapl:0:0", 100, label="core")  # a part of package 0: not counted twice
    bad = _domain(tmp_path, "intel-rapl:1", 0, label="package-1")
    (bad / "energy_uj").write_text("garbage")
    meter = find_meter(tmp_path, **_no_ina(tmp_path))
    assert isinstance(meter, RaplMeter) and [d.name for d in meter.domains] == ["package-0"]
    assert meter.describe() == "RAPL package-0"


def test_energy_between_snapshots_unwraps_the_counter(tmp_path):
    d = _domain(tmp_path, "intel-rapl:0", 999_000)
    meter = find_meter(tmp_path, **_no_ina(tmp_path))
    before = meter.read_uj()
    (d / "energy_uj").write_text("4000")  # wrapped past max_energy_range_uj = 1,000,000
    assert meter.joules_between(before, meter.read_uj()) == pytest.approx(0.005)


def test_rapl_is_preferred_over_an_ina3221(tmp_path):
    _domain(tmp_path / "powercap", "intel-rapl:0", 0)
    _hwmon(tmp_path / "hwmon", "hwmon0", ORIN)
    meter = find_meter(tmp_path / "powercap", hwmon_root=tmp_path / "hwmon", iio_root=tmp_path / "no", start=False)
    assert meter is not None and meter.method == "rapl"
    meter.close()  # a no-op, there for the common interface


# --------------------------------------------------------------------------------------------- INA3221 discovery


def test_hwmon_discovery_picks_the_total_input_rail(tmp_path):
    _hwmon(tmp_path / "hwmon", "hwmon0", {1: ("x", 1, 1)}, chip="coretemp")  # another chip: ignored
    _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    meter = find_meter(tmp_path / "no-powercap", hwmon_root=tmp_path / "hwmon", iio_root=tmp_path / "no",
                       start=False)
    assert isinstance(meter, Ina3221Meter) and meter.method == "ina3221"
    assert [(r.name, r.source) for r in meter.rails] == [("VDD_IN", "hwmon1")]
    assert meter.rails[0].microwatts() == pytest.approx(5e6)  # 5000 mV x 1000 mA
    assert "VDD_IN (hwmon1)" in meter.describe() and "idle included" in meter.describe()


def test_hwmon_attributes_under_device_and_unlabelled_or_disabled_channels(tmp_path):
    d = _hwmon(tmp_path / "hwmon", "hwmon3", {1: (None, 5000, 100), 2: ("VDD_IN", 5000, 400)}, in_device=True)
    (d / "in1_enable").write_text("0\n")  # disabled: not offered
    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", start=False)
    assert [r.name for r in meter.rails] == ["VDD_IN"] and meter.rails[0].microwatts() == pytest.approx(2e6)
    (d / "in1_enable").write_text("1\n")
    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", rails=["in1"], start=False)
    assert [r.name for r in meter.rails] == ["in1"]  # an unlabelled channel is named after its attribute


def test_legacy_iio_discovery_reads_milliwatts(tmp_path):
    _iio(tmp_path / "ina3221x", "6-0040", {0: ("POM_5V_IN", 2500), 1: ("POM_5V_GPU", 300), 2: ("POM_5V_CPU", 900)})
    meter = find_meter(tmp_path / "no-powercap", hwmon_root=tmp_path / "no", iio_root=tmp_path / "ina3221x",
                       start=False)
    assert [(r.name, r.source) for r in meter.rails] == [("POM_5V_IN", "6-0040/iio:device0")]
    assert meter.rails[0].microwatts() == pytest.approx(2.5e6)


def test_legacy_iio_without_power_files_uses_voltage_times_current(tmp_path):
    d = tmp_path / "ina3221x" / "0-0040" / "iio:device0"
    d.mkdir(parents=True)
    (d / "rail_name_0").write_text("VDD_IN\n")
    (d / "in_voltage0_input").write_text("19000\n")
    (d / "in_current0_input").write_text("250\n")
    meter = find_ina3221(tmp_path / "no", tmp_path / "ina3221x", start=False)
    assert meter.rails[0].microwatts() == pytest.approx(4.75e6)


def test_rail_selection_by_name(tmp_path):
    _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    kw = {"hwmon_root": tmp_path / "hwmon", "iio_root": tmp_path / "no", "start": False}
    meter = find_ina3221(rails=["vdd_cpu_gpu_cv", "VDD_SOC"], **kw)  # case-insensitive, summed
    assert [r.name for r in meter.rails] == ["VDD_CPU_GPU_CV", "VDD_SOC"]
    with pytest.raises(ValueError, match=r"VDD_GPU not found; available: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC"):
        find_ina3221(rails=["VDD_GPU"], **kw)


def test_no_total_input_rail_means_no_meter_unless_rails_are_chosen(tmp_path):
    # AGX Xavier style: two chips, no VDD_IN; the total is not a single rail, so nothing is guessed
    _iio(tmp_path / "ina3221x", "1-0040", {0: ("GPU", 1000), 1: ("CPU", 2000), 2: ("SOC", 1500)})
    _iio(tmp_path / "ina3221x", "1-0041", {0: ("CV", 0), 1: ("VDDRQ", 500), 2: ("SYS5V", 1000)}, "iio:device1")
    kw = {"hwmon_root": tmp_path / "no", "iio_root": tmp_path / "ina3221x", "start": False}
    assert find_meter(tmp_path / "no-powercap", **kw) is None
    meter = find_meter(tmp_path / "no-powercap", rails=["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"], **kw)
    assert sum(r.microwatts() for r in meter.rails) == pytest.approx(6e6)


def test_unreadable_rails_are_skipped_and_nothing_readable_means_none(tmp_path):
    assert find_meter(tmp_path / "a", hwmon_root=tmp_path / "b", iio_root=tmp_path / "c", start=False) is None
    d = _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    (d / "curr1_input").write_text("not a number\n")  # VDD_IN unreadable: the sub-rails are no total
    assert find_ina3221(tmp_path / "hwmon", tmp_path / "no", start=False) is None
    (d / "curr1_input").unlink()
    (d / "curr1_input").mkdir()  # reading a directory: OSError
    assert find_ina3221(tmp_path / "hwmon", tmp_path / "no", start=False) is None


def test_a_rail_that_becomes_unreadable_raises_on_read(tmp_path):
    d = _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", clock=StepClock(), start=False)
    before = meter.read_uj()
    (d / "in1_input").unlink()
    with pytest.raises(OSError):  # the runtime catches this and falls back to the model for the request
        meter.read_uj()
    (d / "in1_input").write_text("5000\n")
    # the failed sample left no trace (it did not even read the clock); the next one integrates across the gap
    assert meter.joules_between(before, meter.read_uj()) == pytest.approx(5.0)  # 5 W over the 1 s since


# ------------------------------------------------------------------------------------------- INA3221 integration


def test_constant_power_integrates_to_power_times_time(tmp_path):
    _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)  # VDD_IN: 5 V x 1 A = 5 W
    clock = StepClock(step=0.5)
    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", clock=clock, start=False)  # first sample, t = 0
    before = meter.read_uj()  # t = 0.5
    for _ in range(5):  # what the background thread does between snapshots: no change for a constant power
        meter.sample()
    after = meter.read_uj()  # t = 3.5
    assert after[-1] - before[-1] == 3_000_000_000  # the snapshot's last value: sample time in ns
    assert meter.joules_between(before, after) == pytest.approx(15.0)  # 5 W x 3 s
    assert meter.samples == 8


def test_changing_power_is_integrated_by_trapezoids_and_rails_are_summed(tmp_path):
    d = _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", rails=["VDD_CPU_GPU_CV", "VDD_SOC"],
                         clock=StepClock(step=2.0), start=False)  # 1 W + 1.5 W at t = 0
    before = meter.read_uj()  # t = 2: still 2.5 W -> 5 J so far
    (d / "curr2_input").write_text("600\n")  # VDD_CPU_GPU_CV 1 W -> 3 W
    after = meter.read_uj()  # t = 4: the rise is taken as linear over the 2 s: (1 + 3) / 2 * 2 + 1.5 * 2 = 7 J
    assert meter.joules_between(before, after) == pytest.approx(7.0)
    assert before[:2] == [2_000_000, 3_000_000]  # per-rail counters, uJ


def test_baseline_watts_gives_energy_above_idle(tmp_path):
    _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)  # 5 W
    meter = find_meter(tmp_path / "no-powercap", hwmon_root=tmp_path / "hwmon", iio_root=tmp_path / "no",
                       idle_watts=1.25, start=False)
    meter.clock = StepClock(step=2.0, start=10.0)
    before, after = meter.read_uj(), meter.read_uj()
    assert meter.joules_between(before, after) == pytest.approx((5.0 - 1.25) * 2.0)
    assert "minus 1.25 W idle" in meter.describe()
    meter.baseline_watts = 6.0  # a baseline above the measured power floors at 0, never negative
    assert meter.joules_between(before, after) == 0.0
    with pytest.raises(ValueError, match="snapshots"):
        meter.joules_between(before[:-1], after)


def test_meter_arguments_are_checked():
    with pytest.raises(ValueError):
        Ina3221Meter([])
    rail = Rail("VDD_IN", "x", power_mw=Path("/nonexistent"))
    with pytest.raises(ValueError):
        Ina3221Meter([rail], period_s=0)
    with pytest.raises(ValueError):
        Ina3221Meter([rail], baseline_watts=-1)


def test_background_sampler_runs_until_closed_and_counts_failures(tmp_path):
    d = _hwmon(tmp_path / "hwmon", "hwmon1", ORIN)
    reads = threading.Semaphore(0)

    class SignallingClock(StepClock):
        def __call__(self) -> float:
            reads.release()
            return super().__call__()

    meter = find_ina3221(tmp_path / "hwmon", tmp_path / "no", period_s=0.001, clock=SignallingClock(0.001))
    try:
        for _ in range(3):  # synchronise on samples taken by the thread (no timing is asserted)
            assert reads.acquire(timeout=30)
        (d / "in1_input").write_text("broken\n")
        for _ in range(600):
            if meter.errors:
                break
            threading.Event().wait(0.005)
        assert meter.errors >= 1
    finally:
        meter.close()
    assert meter._thread is None
    meter.close()  # idempotent


# ------------------------------------------------------------------------------------------------------ runtime


def _runtime(tmp_path: Path, meter) -> tuple[EdgeRuntime, object]:
    base_bundle = load_bundle(make_test_bundle(tmp_path / "b"))
    bundle = with_plan(base_bundle, (0.0, 0.0))  # the first exit answers: no radio
    settings = EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False)
    return EdgeRuntime(bundle, FakeClient(bundle), settings, metrics=EdgeMetrics(), meter=meter), bundle


def test_runtime_reports_measured_compute_energy(tmp_path):
    d = _domain(tmp_path / "powercap", "intel-rapl:0", 0)
    meter = find_meter(tmp_path / "powercap", **_no_ina(tmp_path))
    rt, _ = _runtime(tmp_path, meter)

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


def test_runtime_reports_ina3221_energy_above_idle(tmp_path):
    _hwmon(tmp_path / "hwmon", "hwmon1", {1: ("VDD_IN", 5000, 800)})  # 4 W
    meter = find_meter(tmp_path / "no-powercap", hwmon_root=tmp_path / "hwmon", iio_root=tmp_path / "no",
                       idle_watts=1.0, start=False)
    meter.clock = StepClock(step=0.5)  # each sample (request start, request end) is 0.5 s after the previous
    rt, _ = _runtime(tmp_path, meter)
    try:
        res = rt.infer(sample(), "r")
    finally:
        rt.close()
        meter.close()
    assert res.energy_j["compute"] == pytest.approx((4.0 - 1.0) * 0.5)
    get = rt.metrics.registry.get_sample_value
    assert get("splitinfer_edge_energy_joules_total", {"component": "compute", "method": "ina3221"}) == \
        pytest.approx(1.5)
    assert get("splitinfer_edge_energy_joules_total", {"component": "radio", "method": "model"}) == 0.0
    assert rt.status()["device"]["energy_method"] == "ina3221 (compute), model (radio)"
