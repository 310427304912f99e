"""The packaged device profiles: every number sourced, physically sane, and the per-component arithmetic."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources

import pytest
import yaml

from splitinfer.energy import DEFAULT_DEVICE, RadioProfile, get_profile, load_profiles

NUMBERS = ("idle_watts", "active_watts", "active_cores", "compute_slowdown")


def _raw() -> dict:
    return yaml.safe_load(resources.files("splitinfer").joinpath("profiles/devices.yaml").read_text())


def test_the_issue_devices_exist_and_the_default_is_one_of_them():
    profiles = load_profiles()
    assert {"raspberry-pi-4", "jetson-nano", "x86-laptop"} <= set(profiles)
    assert DEFAULT_DEVICE in profiles


@pytest.mark.parametrize("name", sorted(_raw()["devices"]))
def test_every_device_number_is_named_in_a_source(name):
    raw = _raw()["devices"][name]
    sources = raw.get("sources") or []
    assert sources and all(isinstance(s, str) and len(s.strip()) > 20 for s in sources)
    for key in NUMBERS:
        assert key in raw, f"{name}: {key} must be explicit, not defaulted"
        assert any(key in s for s in sources), f"{name}: no source names {key}"


@pytest.mark.parametrize("name", sorted(_raw()["radios"]))
def test_every_radio_is_sourced(name):
    source = _raw()["radios"][name].get("source", "")
    assert "Huang" in source and "joules_per_bit" in source and "active_watts" in source


@pytest.mark.parametrize("name", sorted(_raw()["devices"]))
def test_device_figures_are_physically_plausible(name):
    p = get_profile(name)
    assert 0.1 <= p.idle_watts < p.active_watts <= 100.0  # single-board computers to laptops
    assert 1 <= p.active_cores <= 64
    assert 0.05 <= p.core_watts <= 20.0  # one busy core above idle
    assert 1.0 <= p.compute_slowdown <= 100.0
    r = p.radio
    assert 1e-9 <= r.joules_per_bit <= 1e-5  # 1 nJ/bit .. 10 uJ/bit
    assert 0.01 <= r.active_watts <= 5.0
    assert p.compute_joules(-1.0) == 0.0 and p.radio_joules(-5, -1.0) == 0.0


def test_per_component_energy_of_a_known_request_matches_hand_computed_figures():
    # Raspberry Pi 4 over Wi-Fi: 0.2 s of one busy core, 100 kB sent in 50 ms.
    pi = get_profile("raspberry-pi-4")
    # compute = 0.2 s * (6.4 W - 2.7 W) / 4 cores = 0.2 * 0.925 = 0.185 J
    assert pi.compute_joules(0.2) == pytest.approx(0.185)
    # radio = 100,000 B * 8 bit/B * 2.8317e-7 J/bit + 0.05 s * 0.13286 W = 0.226536 + 0.006643 = 0.233179 J
    assert pi.radio_joules(100_000, 0.05) == pytest.approx(0.233179)

    # Jetson Nano over the same request: compute = 0.2 * (10 - 1.25) / 4 = 0.4375 J
    assert get_profile("jetson-nano").compute_joules(0.2) == pytest.approx(0.4375)
    # x86 laptop: compute = 0.2 * (20 - 5) / 4 = 0.75 J
    assert get_profile("x86-laptop").compute_joules(0.2) == pytest.approx(0.75)

    # The same transfer over LTE: 800,000 bit * 4.3839e-7 J/bit + 0.05 s * 1.28804 W = 0.350712 + 0.064402 J
    lte = _raw()["radios"]["lte"]
    pi_lte = replace(pi, radio=RadioProfile("lte", lte["joules_per_bit"], lte["active_watts"], lte["source"]))
    assert pi_lte.radio_joules(100_000, 0.05) == pytest.approx(0.415114)


def test_a_custom_file_without_active_cores_keeps_the_whole_increment(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({
        "devices": {"box": {"idle_watts": 1.0, "active_watts": 3.0, "radio": "r", "sources": ["x"]}},
        "radios": {"r": {"joules_per_bit": 1e-7, "active_watts": 0.1, "source": "y"}},
    }))
    box = get_profile("box", str(path))
    assert box.active_cores == 1 and box.compute_joules(2.0) == pytest.approx(4.0)


@pytest.mark.parametrize("bad", [{"active_cores": 0}, {"idle_watts": 5.0}, {"radio": "missing"}])
def test_inconsistent_custom_profiles_are_rejected(tmp_path, bad):
    device = {"idle_watts": 1.0, "active_watts": 3.0, "radio": "r", **bad}
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump({"devices": {"box": device},
                                    "radios": {"r": {"joules_per_bit": 1e-7, "active_watts": 0.1}}}))
    with pytest.raises(ValueError):
        load_profiles(str(path))
