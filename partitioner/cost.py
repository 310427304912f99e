"""Cost model: expected end-to-end latency, bytes and edge energy of every split.

For split ``k`` the edge runs stages ``[:k]`` and the exit heads at boundaries ``<= k`` (exits beyond the
split are not on the device). A sample answered by exit ``b`` costs the head up to ``b`` plus every exit
evaluated so far. The rest (fraction ``q``) also pays the remaining head, the encoding, the uplink transfer
of the request (payload + per-message protocol overhead), one RTT, queueing and decoding and the tail on
the server, and the downlink transfer of the response (the logits + overhead)::

    E[latency] = sum_b p_b * t_b + q * (t_head(k) + t_exits(<=k) + encode + up + rtt + loss + wait + decode
                                         + tail + down)

* ``loss``: with per-packet loss probability ``p`` a message of ``m`` packets is hit with probability
  ``1 - (1 - p)^m``; each hit costs about one retransmission timeout (``max(200 ms, 2 RTT)``; TCP's minimum
  RTO on Linux is 200 ms).
* ``wait``: server queueing at a given load of ``lambda`` offloaded requests per second from all clients, an
  M/D/1 queue with the tail's measured service time ``S``: ``rho S / (2 (1 - rho))``, ``rho = lambda S``
  (no estimate when ``rho >= 1``: the server cannot keep up).

Every request also pays the agent's own per-request work (``request_overhead_ms`` of the edge profile: input
checks, scoring, metrics; the edge agent reports it as ``agent_overhead_ms`` in ``/v1/status``), and every exit
it evaluates the agent's work around the exit head (``exit_overhead_ms``: scoring, the decision, accounting; 0
unless measured, as ``bench.joint``'s verification does).
Edge compute times are scaled by ``edge_slowdown`` (1 when the edge profile was measured on the edge).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from partitioner.profile import Profile
from splitinfer.bundle import SplitEstimate
from splitinfer.energy import DeviceProfile

# gRPC/HTTP2/OIP bytes per offloaded request beyond its payload, counted on the wire by the link emulator on
# our ModelInfer messages: 212-259 B (median 231; ~155 B protobuf: model name, id, parameters, tensor metadata;
# the rest HTTP/2 and gRPC framing). Responses carrying 10 logits: 178-238 B in total. `plan probe` reports it.
PROTOCOL_OVERHEAD_BYTES = 240
RESPONSE_OVERHEAD_BYTES = 200
MSS_BYTES = 1448
MIN_RTO_S = 0.2


@dataclass(frozen=True)
class Link:
    """A network condition: uplink bandwidth (bit/s), round-trip time (s), per-packet loss probability,
    downlink bandwidth (None: the same as the uplink) and per-message protocol overheads (bytes)."""

    bandwidth_bps: float
    rtt_s: float
    loss: float = 0.0
    down_bps: float | None = None
    request_overhead: int = PROTOCOL_OVERHEAD_BYTES
    response_overhead: int = RESPONSE_OVERHEAD_BYTES

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or (self.down_bps is not None and not self.down_bps > 0):
            raise ValueError("bandwidth must be positive")
        if self.rtt_s < 0 or not 0 <= self.loss < 1:
            raise ValueError("rtt must be >= 0 and loss within [0, 1)")

    def transfer_s(self, nbytes: int) -> float:
        """Uplink serialization time of a request carrying ``nbytes`` of payload."""
        return (nbytes + self.request_overhead) * 8 / self.bandwidth_bps

    def response_s(self, nbytes: int) -> float:
        """Downlink serialization time of a response carrying ``nbytes`` of payload."""
        return (nbytes + self.response_overhead) * 8 / (self.down_bps or self.bandwidth_bps)

    def loss_s(self, nbytes: int) -> float:
        """Expected retransmission delay of one exchange moving ``nbytes`` in total."""
        if self.loss <= 0:
            return 0.0
        packets = max(1, math.ceil(nbytes / MSS_BYTES))
        return (1 - (1 - self.loss) ** packets) * max(MIN_RTO_S, 2 * self.rtt_s)


def queue_wait_s(service_s: float, load_rps: float) -> float:
    """M/D/1 mean waiting time at arrival rate ``load_rps``; ``inf`` when the server is saturated."""
    if load_rps <= 0 or service_s <= 0:
        return 0.0
    rho = load_rps * service_s
    if rho >= 1:
        return math.inf
    return rho * service_s / (2 * (1 - rho))


# Bandwidth is always in bits per second, written as tc writes bit rates: ``5mbit``, ``500kbit``, ``1.5gbit``,
# ``2000000`` (bit/s); ``5Mbit/s`` and ``5mbit/s`` too. Byte units (``5MB``, ``5MB/s``) and ``bps`` forms are
# refused rather than guessed: tc reads ``5mbps`` as megaBYTES per second, most people as megabits.
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?:([kmg]?)bit(?:/s)?)?\s*$", re.IGNORECASE)
_BYTE_RATE = re.compile(r"^\s*[0-9.e+-]+\s*[kmg]?(b|bytes?)(/s|ps)?\s*$")  # capital B or 'bytes'
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(us|ms|s)?\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
BANDWIDTH_HELP = "bits per second: 5mbit, 500kbit, 1.5gbit or a bare number of bit/s (byte units are refused)"


def parse_bandwidth(text: str) -> float:
    """``"5mbit"``, ``"500kbit"``, ``"1.5gbit"``, ``"2000000"`` -> bits per second (see ``BANDWIDTH_HELP``)."""
    m = _RATE.match(text)
    if not m:
        low = text.strip().lower()
        if low.endswith(("bps", "b/s")) or re.search(r"[0-9.]\s*[kmg]?b$", low) or _BYTE_RATE.match(text):
            num = re.match(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)", low)
            hint = (f"; {num.group(1)} {dict(k='kilo', m='mega', g='giga').get(num.group(2), '')}bytes per second "
                    f"is {format_bandwidth(float(num.group(1)) * 8 * _SCALE[num.group(2)])}") if num else ""
            raise ValueError(f"bandwidth {text!r} is ambiguous (bits or bytes?): write bits per second as "
                             f"5mbit, 500kbit or 2000000{hint}")
        raise ValueError(f"bandwidth {text!r} must be bits per second like 5mbit, 500kbit or 2000000")
    value = float(m.group(1)) * _SCALE[(m.group(2) or "").lower()]
    if value == float("inf"):
        raise ValueError(f"bandwidth {text!r} must be finite")
    if not value > 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value


def format_bandwidth(bps: float) -> str:
    """Bits per second as ``parse_bandwidth`` reads them, without exponents: 2.22e9 -> ``"2.22gbit"``."""
    text = f"{_plain(bps)}bit"
    for factor, unit in ((1e3, "kbit"), (1e6, "mbit"), (1e9, "gbit")):
        if float(_plain(bps / factor)) >= 1:  # after rounding: 999950 is 1mbit, not 1000kbit
            text = f"{_plain(bps / factor)}{unit}"
    return text


def format_duration(seconds: float) -> str:
    """Seconds as ``parse_duration`` reads them: 0.0203 -> ``"20.3ms"``, 0.0004 -> ``"400us"``."""
    if seconds >= 1e-3 or seconds == 0:
        return f"{_plain(seconds * 1e3)}ms"
    return f"{_plain(seconds * 1e6)}us"


def _plain(value: float) -> str:
    """Four significant digits, never in exponent notation (``1234.5`` -> ``"1235"``, ``0.01234`` -> ``"0.01234"``)."""
    digits = max(0, 3 - math.floor(math.log10(abs(value)))) if value else 0
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_duration(text: str) -> float:
    """``"20ms"``, ``"0.02s"``, ``"500us"`` -> seconds (a bare number means milliseconds)."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"duration {text!r} must look like 20ms, 0.02s or 500us")
    unit = (m.group(2) or "ms").lower()
    value = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    if value == float("inf"):
        raise ValueError(f"duration {text!r} must be finite")
    return value


def estimate_split(k: int, edge: Profile, server: Profile, exit_rates: dict[int, float], link: Link,
                   edge_slowdown: float = 1.0, device: DeviceProfile | None = None,
                   server_load_rps: float = 0.0) -> SplitEstimate:
    """Expected latency (ms), bytes and edge energy for split ``k`` given per-exit rates (fractions of all
    samples answered at each exit, in boundary order) and the server's load (offloaded requests/s)."""
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
        exits_ms += s * (edge.exit_ms[b] + edge.exit_overhead_ms)
        t = head_ms(b) + exits_ms
        expected += exit_rates[b] * t
        compute_s += exit_rates[b] * t / 1e3
        answered += exit_rates[b]
    q = max(0.0, 1.0 - answered)
    expected += s * edge.request_overhead_ms  # the agent's own per-request work, whoever answers
    edge_ms = head_ms(k) + exits_ms
    out_bytes = server.output_bytes or edge.output_bytes
    if k == n:  # edge-only: nothing is sent
        payload, transfer_ms, server_ms, enc_ms, network_ms = 0, 0.0, 0.0, 0.0, 0.0
        offload_ms = edge_ms
    else:
        payload = edge.payload_bytes[k]
        enc_ms = s * edge.encode_ms[k]
        transfer_ms = link.transfer_s(payload) * 1e3
        service_ms = server.decode_ms[k] + sum(server.stage_ms[k:])
        server_ms = service_ms + queue_wait_s(service_ms / 1e3, server_load_rps) * 1e3
        network_ms = (transfer_ms + link.rtt_s * 1e3 + link.response_s(out_bytes) * 1e3
                      + link.loss_s(payload + out_bytes + link.request_overhead + link.response_overhead) * 1e3)
        offload_ms = edge_ms + enc_ms + network_ms + server_ms
    expected += q * offload_ms
    compute_s += q * (edge_ms + enc_ms) / 1e3
    energy = None
    if device is not None:
        energy = device.compute_joules(compute_s) + q * device.radio_joules(payload, transfer_ms / 1e3)
    return SplitEstimate(
        split=k, expected_latency_ms=round(expected, 4), edge_ms=round(edge_ms + enc_ms, 4),
        transfer_ms=round(transfer_ms, 4), server_ms=round(server_ms, 4), bytes_per_offload=int(payload),
        offload_rate=round(q if k < n else 0.0, 4), exits=active, network_ms=round(network_ms, 4),
        response_bytes=int(out_bytes) if k < n else 0,
        expected_energy_j=None if energy is None else round(energy, 6),
    )


def estimate_all(edge: Profile, server: Profile, exit_rates: dict[int, float], link: Link,
                 edge_slowdown: float = 1.0, device: DeviceProfile | None = None,
                 server_load_rps: float = 0.0) -> list[SplitEstimate]:
    """Estimates for every split 0..N."""
    n = len(edge.stage_ms)
    return [estimate_split(k, edge, server, exit_rates, link, edge_slowdown, device, server_load_rps)
            for k in range(n + 1)]
