"""Measured energy where the hardware exposes it: Linux powercap (Intel/AMD RAPL) package counters.

``find_meter()`` returns a :class:`RaplMeter` when ``/sys/class/powercap/intel-rapl:N/energy_uj`` is readable
(top-level package domains only; their sub-domains are parts of them), else None; the edge agent then falls
back to its power model and labels figures ``method="model"``. RAPL counts the whole package: other processes'
work during a request is included, which is why the agent reports per-request figures from it only as
``method="rapl"`` and keeps the modelled radio energy (RAPL does not see the radio).

Not supported here (no such sensor on this machine to test with): INA3221 rails on Jetson boards (hwmon
``in*_input``/``curr*_input`` need sampling, not a counter).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
_PACKAGE = re.compile(r"^intel-rapl:\d+$")


@dataclass(frozen=True)
class _Domain:
    name: str
    energy: Path
    max_range_uj: int


class RaplMeter:
    """Sums the package domains' energy counters (microjoules), handling wrap-around."""

    method = "rapl"

    def __init__(self, domains: list[_Domain]):
        if not domains:
            raise ValueError("no RAPL domains")
        self.domains = domains
        self._lock = threading.Lock()

    def read_uj(self) -> list[int]:
        """Raw counters of every domain."""
        return [int(d.energy.read_text().strip()) for d in self.domains]

    def joules_between(self, before: list[int], after: list[int]) -> float:
        """Energy between two :meth:`read_uj` snapshots (a counter that wrapped is unwrapped once)."""
        total = 0
        for d, a, b in zip(self.domains, before, after, strict=True):
            delta = b - a
            if delta < 0:
                delta += d.max_range_uj
            total += max(0, delta)
        return total / 1e6

    def describe(self) -> str:
        return "RAPL " + ", ".join(d.name for d in self.domains)


def find_meter(root: Path = POWERCAP) -> RaplMeter | None:
    """The RAPL meter of this machine, or None when there is none (or it is not readable)."""
    if not root.is_dir():
        return None
    domains = []
    for d in sorted(root.iterdir()):
        if not _PACKAGE.match(d.name):
            continue
        energy = d / "energy_uj"
        try:
            int(energy.read_text().strip())
            max_range = int((d / "max_energy_range_uj").read_text().strip())
            name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
        except (OSError, ValueError):
            continue  # unreadable (often root-only since CVE-2020-8694) or malformed
        domains.append(_Domain(name=name, energy=energy, max_range_uj=max_range))
    return RaplMeter(domains) if domains else None
