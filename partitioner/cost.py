"""Cost model: expected end-to-end latency, bytes and edge energy of every split.

For split ``k`` the edge runs stages ``[:k]`` and the exit heads at boundaries ``<= k`` (exits beyond the
split are not on the device). A sample answered by exit ``b`` costs the head up to ``b`` plus every exit
evaluated so far. The rest (fraction ``q``) also pays the remaining head, the encoding, the transfer
(payload + protocol overhead at the link bandwidth), one RTT, decoding and the tail on the server::

    E[latency] = sum_b p_b * t_b + q * (t_head(k) + t_exits(<=k) + encode + transfer + rtt + decode + tail)

Edge compute times are scaled by ``edge_slowdown`` (1 when planning for this machine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from partitioner.profile import Profile
from splitinfer.bundle import SplitEstimate
from splitinfer.energy import DeviceProfile

# gRPC/HTTP2/OIP framing per offloaded request (headers, tensor metadata, parameters), measured on our
# ModelInfer messages: serialized request minus payload is ~150 B, HTTP/2 frames and headers ~250 B.
PROTOCOL_OVERHEAD_BYTES = 400


@dataclass(frozen=True)
class Link:
    """A network condition: uplink bandwidth (bit/s) and round-trip time (s)."""

    bandwidth_bps: float
    rtt_s: float

    def transfer_s(self, nbytes: int) -> float:
        return (nbytes + PROTOCOL_OVERHEAD_BYTES) * 8 / self.bandwidth_bps


_RATE = re.compile(r"^\s*([0-9.]+)\s*([kmg]?)(bit|bps|b)?(/s)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*([0-9.]+)\s*(us|ms|s)?\s*$", re.IGNORECASE)


def parse_bandwidth(text: str) -> float:
    """``"5mbit"``, ``"500kbit"``, ``"1.5gbit"``, ``"2000000"`` -> bits per second."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"bandwidth {text!r} must look like 5mbit, 500kbit or 2000000")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value


def parse_duration(text: str) -> float:
    """``"20ms"``, ``"0.02s"``, ``"500us"`` -> seconds (a bare number means milliseconds)."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"duration {text!r} must look like 20ms, 0.02s or 500us")
    unit = (m.group(2) or "ms").lower()
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def estimate_split(k: int, edge: Profile, server: Profile, exit_rates: dict[int, float], link: Link,
                   edge_slowdown: float = 1.0, device: DeviceProfile | None = None) -> SplitEstimate:
    """Expected latency (ms), bytes and edge energy for split ``k`` given per-exit rates (fractions of all
    samples answered at each exit, in boundary order)."""
    n = len(edge.stage_ms)
    active = sorted(b for b in exit_rates if 0 < b <= k and b < n and b in edge.exit_ms)
    s = edge_slowdown

    def head_ms(upto: int) -> float:
        return s * sum(edge.stage_ms[:upto])

    expected = 0.0
    exits_ms = 0.0
    answered = 0.0
    compute_s = 0.0
    for b in active:
        exits_ms += s * edge.exit_ms[b]
        t = head_ms(b) + exits_ms
        expected += exit_rates[b] * t
        compute_s += exit_rates[b] * t / 1e3
        answered += exit_rates[b]
    q = max(0.0, 1.0 - answered)
    edge_ms = head_ms(k) + exits_ms
    if k == n:  # edge-only: nothing is sent
        payload, transfer_ms, server_ms, enc_ms = 0, 0.0, 0.0, 0.0
        offload_ms = edge_ms
    else:
        payload = edge.payload_bytes[k]
        enc_ms = s * edge.encode_ms[k]
        transfer_ms = link.transfer_s(payload) * 1e3
        server_ms = server.decode_ms[k] + sum(server.stage_ms[k:])
        offload_ms = edge_ms + enc_ms + transfer_ms + link.rtt_s * 1e3 + server_ms
    expected += q * offload_ms
    compute_s += q * (edge_ms + enc_ms) / 1e3
    energy = None
    if device is not None:
        energy = device.compute_joules(compute_s) + q * device.radio_joules(payload, transfer_ms / 1e3)
    return SplitEstimate(
        split=k, expected_latency_ms=round(expected, 4), edge_ms=round(edge_ms + enc_ms, 4),
        transfer_ms=round(transfer_ms, 4), server_ms=round(server_ms, 4), bytes_per_offload=int(payload),
        offload_rate=round(q if k < n else 0.0, 4), exits=active,
        expected_energy_j=None if energy is None else round(energy, 6),
    )


def estimate_all(edge: Profile, server: Profile, exit_rates: dict[int, float], link: Link,
                 edge_slowdown: float = 1.0, device: DeviceProfile | None = None) -> list[SplitEstimate]:
    """Estimates for every split 0..N."""
    n = len(edge.stage_ms)
    return [estimate_split(k, edge, server, exit_rates, link, edge_slowdown, device) for k in range(n + 1)]
