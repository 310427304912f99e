"""Measured energy where the hardware exposes it: RAPL package counters or INA3221 rail monitors.

``find_meter()`` looks, in order, for

1. Linux powercap (Intel/AMD RAPL): ``/sys/class/powercap/intel-rapl:N/energy_uj``, top-level package domains
   only (their sub-domains are parts of them) -> :class:`RaplMeter`, ``method = "rapl"``;
2. a TI INA3221 power monitor (NVIDIA Jetson boards), either through the mainline hwmon driver
   (``/sys/class/hwmon/hwmon*/name == "ina3221"``: ``in{1,2,3}_input`` bus mV, ``curr{1,2,3}_input`` mA,
   ``in{1,2,3}_label`` rail names) or the legacy L4T IIO driver (``/sys/bus/i2c/drivers/ina3221x/*/iio:device*``:
   ``in_power{0,1,2}_input`` mW, ``rail_name_{0,1,2}``) -> :class:`Ina3221Meter`, ``method = "ina3221"``;

and returns None when neither is readable; the edge agent then uses its power model (``method="model"``).

Both meters have the same interface: ``snap = meter.read_uj()`` before and after a piece of work, then
``meter.joules_between(before, after)``; ``describe()`` names what is measured, ``close()`` releases it.

What each measures differs, and the metric's ``method`` label says which:

* RAPL counts the whole CPU package (cores, caches, integrated GPU, memory controller), its idle floor and
  other processes' work included. It does not see the radio, DRAM (on most parts) or the rest of the board.
* An INA3221 has no energy counter, only instantaneous bus voltage and current per rail, so
  :class:`Ina3221Meter` samples the chosen rail(s) on a background thread (every ``period_s``, and once more at
  every ``read_uj()``) and integrates power over time (trapezoids) into a cumulative microjoule counter. The
  default rail is the module's total input (``VDD_IN``, ``POM_5V_IN`` on the Nano), which includes the board's
  idle power; pass ``baseline_watts`` (``find_meter(idle_watts=profile.idle_watts)``) to get energy above idle
  (board energy minus baseline x elapsed time, floored at 0), which is what the power model reports.
  Carrier-board peripherals (M.2/USB Wi-Fi) are outside ``VDD_IN``, so the radio stays modelled either way.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("splitinfer.power")

POWERCAP = Path("/sys/class/powercap")
HWMON = Path("/sys/class/hwmon")
INA3221X = Path("/sys/bus/i2c/drivers/ina3221x")
PREFERRED_RAILS = ("VDD_IN", "POM_5V_IN")
"""Total module input rails, in order of preference (Orin/Xavier NX/TX2 name, then the Nano's)."""
DEFAULT_PERIOD_S = 0.01
_PACKAGE = re.compile(r"^intel-rapl:\d+$")


class EnergyMeter(Protocol):
    """What the edge agent needs from a measured energy source."""

    method: str

    def read_uj(self) -> list[int]: ...

    def joules_between(self, before: list[int], after: list[int]) -> float: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------------- RAPL


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

    def close(self) -> None:
        """Nothing to release (counters are read on demand)."""


def find_rapl(root: Path = POWERCAP) -> RaplMeter | None:
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


# ------------------------------------------------------------------------------------------------------ INA3221


def _read_number(path: Path) -> float:
    return float(path.read_text().strip())


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its rail name, where it was found, and the files its power is computed from.

    Either ``power_mw`` (legacy IIO ``in_power<N>_input``, milliwatts) or both ``voltage_mv`` and
    ``current_ma`` (hwmon ``in<N>_input`` / ``curr<N>_input``, or IIO ``in_voltage<N>`` / ``in_current<N>``).
    """

    name: str
    source: str
    power_mw: Path | None = None
    voltage_mv: Path | None = None
    current_ma: Path | None = None

    def microwatts(self) -> float:
        """Instantaneous power of the rail (raises OSError/ValueError when a file cannot be read)."""
        if self.power_mw is not None:
            return _read_number(self.power_mw) * 1e3
        if self.voltage_mv is None or self.current_ma is None:
            raise ValueError(f"rail {self.name} has neither a power file nor voltage and current files")
        return _read_number(self.voltage_mv) * _read_number(self.current_ma)  # mV x mA = uW


class Ina3221Meter:
    """Integrates sampled INA3221 rail power into cumulative microjoules (one counter per rail).

    A snapshot (:meth:`read_uj`) is ``[uJ of rail 0, ..., uJ of rail n-1, sample time in ns]``; the time lets
    :meth:`joules_between` subtract ``baseline_watts`` x elapsed. Every :meth:`read_uj` takes a fresh sample
    first, so a snapshot is exact up to the moment it is taken; the background thread (:meth:`start`) only
    keeps the integral fine-grained between snapshots. ``clock`` (seconds, monotonic) is injectable for tests.
    """

    method = "ina3221"

    def __init__(self, rails: Sequence[Rail], period_s: float = DEFAULT_PERIOD_S, baseline_watts: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if not rails:
            raise ValueError("no INA3221 rails")
        if not period_s > 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        if baseline_watts < 0:
            raise ValueError(f"baseline_watts must be >= 0, got {baseline_watts}")
        self.rails = list(rails)
        self.period_s = float(period_s)
        self.baseline_watts = float(baseline_watts)
        self.clock = clock
        self.samples = 0
        self.errors = 0
        self._energy_uj = [0.0] * len(self.rails)
        self._last_t: float | None = None
        self._last_uw: list[float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Read every rail once and add the trapezoid since the previous sample to the counters."""
        with self._lock:
            uw = [r.microwatts() for r in self.rails]  # raises before any state changes
            t = self.clock()
            if self._last_t is not None and self._last_uw is not None:
                dt = max(0.0, t - self._last_t)
                for i, (p0, p1) in enumerate(zip(self._last_uw, uw, strict=True)):
                    self._energy_uj[i] += 0.5 * (p0 + p1) * dt
            self._last_t, self._last_uw = t, uw
            self.samples += 1

    def read_uj(self) -> list[int]:
        """Sample now, then return the counters and the sample time (see the class docstring)."""
        self.sample()
        with self._lock:
            assert self._last_t is not None
            return [round(e) for e in self._energy_uj] + [round(self._last_t * 1e9)]

    def joules_between(self, before: list[int], after: list[int]) -> float:
        """Energy of the selected rails between two snapshots, minus ``baseline_watts`` x elapsed, floored at 0."""
        n = len(self.rails)
        if len(before) != n + 1 or len(after) != n + 1:
            raise ValueError(f"expected snapshots of {n + 1} values (from read_uj), got {len(before)}, {len(after)}")
        joules = sum(b - a for a, b in zip(before[:n], after[:n], strict=True)) / 1e6
        elapsed_s = max(0, after[n] - before[n]) / 1e9
        return max(0.0, joules - self.baseline_watts * elapsed_s)

    def describe(self) -> str:
        rails = ", ".join(f"{r.name} ({r.source})" for r in self.rails)
        idle = (f"minus {self.baseline_watts:g} W idle" if self.baseline_watts else "board input, idle included")
        return f"INA3221 {rails}, sampled every {self.period_s * 1e3:g} ms, {idle}"

    def start(self) -> Ina3221Meter:
        """Start the background sampler (a daemon thread); idempotent. Returns self."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ina3221-sampler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background sampler, if running."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (OSError, ValueError):
                self.errors += 1
                if self.errors == 1:
                    log.warning("INA3221 sample failed (further failures are counted, not logged)", exc_info=True)
            self._stop.wait(self.period_s)


def _readable(rail: Rail) -> bool:
    try:
        rail.microwatts()
    except (OSError, ValueError):
        return False
    return True


def _hwmon_rails(root: Path) -> list[Rail]:
    """Channels of mainline ``ina3221`` hwmon devices (attributes in ``hwmonN/`` or, on old kernels, ``device/``)."""
    rails: list[Rail] = []
    if not root.is_dir():
        return rails
    for h in sorted(root.iterdir()):
        for d in (h, h / "device"):
            try:
                if (d / "name").read_text().strip() == "ina3221" and (d / "in1_input").exists():
                    break
            except OSError:
                continue
        else:
            continue
        for ch in (1, 2, 3):
            enable = d / f"in{ch}_enable"
            try:
                if enable.exists() and enable.read_text().strip() == "0":
                    continue
                label = d / f"in{ch}_label"
                name = label.read_text().strip() if label.exists() else f"in{ch}"
            except OSError:
                continue
            rails.append(Rail(name=name or f"in{ch}", source=h.name, voltage_mv=d / f"in{ch}_input",
                              current_ma=d / f"curr{ch}_input"))
    return rails


def _iio_rails(root: Path) -> list[Rail]:
    """Channels of the legacy L4T ``ina3221x`` IIO driver (``rail_name_N``, ``in_power<N>_input`` in mW)."""
    rails: list[Rail] = []
    if not root.is_dir():
        return rails
    for dev in sorted(root.glob("*/iio:device*")):
        for ch in (0, 1, 2):
            try:
                name = (dev / f"rail_name_{ch}").read_text().strip()
            except OSError:
                continue
            power = dev / f"in_power{ch}_input"
            source = f"{dev.parent.name}/{dev.name}"
            if power.exists():
                rails.append(Rail(name=name, source=source, power_mw=power))
            else:
                rails.append(Rail(name=name, source=source, voltage_mv=dev / f"in_voltage{ch}_input",
                                  current_ma=dev / f"in_current{ch}_input"))
    return rails


def ina3221_rails(hwmon_root: Path = HWMON, iio_root: Path = INA3221X) -> list[Rail]:
    """Every readable INA3221 channel of this machine (hwmon first, then legacy IIO)."""
    return [r for r in _hwmon_rails(hwmon_root) + _iio_rails(iio_root) if _readable(r)]


def select_rails(available: Sequence[Rail], rails: Sequence[str] | None = None) -> list[Rail]:
    """The rails to meter: ``rails`` by name (case-insensitive, all must exist, summed), or by default the
    first of :data:`PREFERRED_RAILS` present (one rail: the total input; the others are parts of it).

    Returns [] when no default rail is present; raises ValueError naming the available rails when a requested
    one is missing.
    """
    by_name: dict[str, Rail] = {}
    for r in available:
        by_name.setdefault(r.name.upper(), r)
    if rails:
        missing = [n for n in rails if n.upper() not in by_name]
        if missing:
            raise ValueError(f"INA3221 rail(s) {', '.join(missing)} not found; available: "
                             f"{', '.join(r.name for r in available) or 'none'}")
        return [by_name[n.upper()] for n in dict.fromkeys(rails)]
    for n in PREFERRED_RAILS:
        if n in by_name:
            return [by_name[n]]
    return []


def find_ina3221(hwmon_root: Path = HWMON, iio_root: Path = INA3221X, rails: Sequence[str] | None = None,
                 idle_watts: float | None = None, period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic, start: bool = True) -> Ina3221Meter | None:
    """An INA3221 meter on the selected rails (see :func:`select_rails`), or None when there is none.

    ``idle_watts`` becomes the meter's baseline (energy above idle); ``start`` runs the background sampler.
    """
    available = ina3221_rails(hwmon_root, iio_root)
    if not available:
        return None
    chosen = select_rails(available, rails)
    if not chosen:
        log.info("INA3221 found but none of the total-input rails %s; available: %s (choose with rails=...)",
                 ", ".join(PREFERRED_RAILS), ", ".join(r.name for r in available))
        return None
    meter = Ina3221Meter(chosen, period_s=period_s, baseline_watts=idle_watts or 0.0, clock=clock)
    try:
        meter.sample()  # the integral starts now
    except (OSError, ValueError):
        log.warning("INA3221 rails %s became unreadable", ", ".join(r.name for r in chosen), exc_info=True)
        return None
    return meter.start() if start else meter


# -------------------------------------------------------------------------------------------------- discovery


def find_meter(root: Path = POWERCAP, *, hwmon_root: Path = HWMON, iio_root: Path = INA3221X,
               rails: Sequence[str] | None = None, idle_watts: float | None = None,
               period_s: float = DEFAULT_PERIOD_S, start: bool = True) -> RaplMeter | Ina3221Meter | None:
    """This machine's energy meter: RAPL under ``root`` if readable, else an INA3221, else None.

    The INA3221 options (``rails``, ``idle_watts``, ``period_s``, ``start``) are those of :func:`find_ina3221`;
    ``idle_watts`` does not apply to RAPL (a package counter has no board idle to subtract).
    """
    rapl = find_rapl(root)
    if rapl is not None:
        return rapl
    return find_ina3221(hwmon_root, iio_root, rails=rails, idle_watts=idle_watts, period_s=period_s, start=start)
