"""Edge energy: a documented power model per device profile, driven by measured CPU time and bytes.

Per request, energy = compute + radio (``docs/energy.md``):

* compute = busy core-seconds x (active_watts - idle_watts) / active_cores: the energy above idle of the
  request's CPU work, where ``active_watts`` was measured with ``active_cores`` cores busy;
* radio = bits sent x joules_per_bit + transfer seconds x radio active_watts (Huang et al., MobiSys 2012).

No power sensor is assumed. Where one is readable (Linux powercap/RAPL, a Jetson INA3221) the edge agent
measures compute energy with it instead (:mod:`splitinfer.power`, ``method="rapl"`` / ``"ina3221"``); this
module's figures are ``method="model"``, so metrics say how a number was obtained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import yaml

DEFAULT_DEVICE = "raspberry-pi-4"


@dataclass(frozen=True)
class RadioProfile:
    name: str
    joules_per_bit: float
    active_watts: float
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    """Power figures of one device class, with the sources they come from."""

    name: str
    description: str
    idle_watts: float
    active_watts: float
    compute_slowdown: float
    radio: RadioProfile
    sources: list[str] = field(default_factory=list)
    active_cores: int = 1
    """Cores busy when ``active_watts`` was measured (e.g. 4 for ``stress --cpu 4`` on a quad-core)."""

    @property
    def core_watts(self) -> float:
        """Power above idle of one busy core (the active-minus-idle increment shared out over its cores)."""
        return (self.active_watts - self.idle_watts) / self.active_cores

    def compute_joules(self, cpu_seconds: float) -> float:
        """Energy above idle for ``cpu_seconds`` of busy CPU (core-seconds, as ``time.thread_time`` counts)."""
        return max(0.0, cpu_seconds) * self.core_watts

    def radio_joules(self, nbytes: int, transfer_seconds: float) -> float:
        """Uplink radio energy for sending ``nbytes`` during ``transfer_seconds``."""
        return max(0, nbytes) * 8 * self.radio.joules_per_bit + max(0.0, transfer_seconds) * self.radio.active_watts


def load_profiles(path: str | None = None) -> dict[str, DeviceProfile]:
    """Read device profiles from a YAML file (default: the packaged ``profiles/devices.yaml``)."""
    if path is None:
        text = resources.files("splitinfer").joinpath("profiles/devices.yaml").read_text()
    else:
        with open(path) as fh:
            text = fh.read()
    raw = yaml.safe_load(text)
    radios = {n: RadioProfile(name=n, joules_per_bit=float(r["joules_per_bit"]), active_watts=float(r["active_watts"]),
                              source=str(r.get("source", ""))) for n, r in raw.get("radios", {}).items()}
    out = {}
    for name, d in raw.get("devices", {}).items():
        if d["radio"] not in radios:
            raise ValueError(f"device {name} names unknown radio {d['radio']!r}")
        profile = DeviceProfile(name=name, description=d.get("description", ""), idle_watts=float(d["idle_watts"]),
                                active_watts=float(d["active_watts"]),
                                compute_slowdown=float(d.get("compute_slowdown", 1.0)),
                                radio=radios[d["radio"]], sources=list(d.get("sources", [])),
                                active_cores=int(d.get("active_cores", 1)))
        if profile.active_cores < 1 or not 0 <= profile.idle_watts <= profile.active_watts:
            raise ValueError(f"device {name}: need active_cores >= 1 and 0 <= idle_watts <= active_watts")
        out[name] = profile
    return out


def get_profile(name: str = DEFAULT_DEVICE, path: str | None = None) -> DeviceProfile:
    """One device profile by name; ValueError listing the known names otherwise."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ValueError(f"unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]
