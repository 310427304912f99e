"""Closed-loop gRPC load generator for ``bench.serving``: the same client for every server under test.

``python -m bench.loadgen --spec SPEC.json --out RESULT.json`` runs, for each point of the spec, ``concurrency``
clients in one grpc.aio event loop (this process; the benchmark starts it apart from the servers). Each
client sends one request, waits for its answer, checks it and sends the next (closed loop), cycling through
the pre-serialized requests of ``requests`` starting at its own index, so every server sees the same
sequence of messages. A point runs at least ``warmup_s`` of unrecorded traffic, and until every client has
had an answer (one full round of the closed loop, so the server's queue is in its steady state even where a
round takes longer than the warm-up), then ``duration_s`` of measurement; the clients then stop sending and
the requests still in flight are drained (checked, not timed).

Requests are sent as serialized bytes through a generic ``unary_unary`` call (no per-call protobuf
encoding in the load generator); every answer is parsed and checked: status OK, an output named
``expect.output`` of shape ``expect.shape`` whose raw contents hold exactly that many FP32 values. A few
answers' raw logits are kept (``[request index, hex]``) for the caller to compare with a reference.
Anything else counts as an error under its gRPC status name (``BAD_RESPONSE`` for a malformed answer).

Per point: requests answered in the window and their latency (p50/p90/p99/mean/max), throughput (answers
completed in the window / window length), errors by code over the whole point (warm-up and drain
included), the CPU the load generator itself used (cores, from ``time.process_time``) and, when
``server_pid`` is given, the CPU of that process and all its descendants over the window (from
``/proc``; MLServer's worker processes included), and what the rest of the machine used meanwhile
(``other_cpu_cores``: busy CPU from ``/proc/stat`` minus both; anything well above 0 means other work
competed for the cores and the point is not clean).

Spec (JSON)::

    {"target": "127.0.0.1:PORT", "requests": "FILE", "expect": {"output": "logits", "shape": [1, 10]},
     "points": [{"concurrency": 4, "warmup_s": 1.0, "duration_s": 5.0}, ...],
     "timeout_s": 60, "channels": "per-client" | N, "server_pid": PID | null, "keep_samples": 3}

``FILE`` holds the serialized ``inference.ModelInferRequest`` messages, each as a 4-byte little-endian
length then the bytes (:func:`write_requests`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def write_requests(path: Path, blobs: list[bytes]) -> None:
    """Write serialized requests as ``<u32 length><bytes>`` records."""
    with open(path, "wb") as f:
        for b in blobs:
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def read_requests(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if not out:
        raise ValueError(f"{path} holds no requests")
    return out


# ------------------------------------------------------------------------------------------------ CPU time

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its live descendants (0 when it is gone)."""
    tree = _children()
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        todo.extend(tree.get(p, []))
    return total


def machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idle and I/O wait since boot (``/proc/stat``)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / _CLK_TCK


# --------------------------------------------------------------------------------------------- statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    return {"p50": round(percentile(ms, 50), 4), "p90": round(percentile(ms, 90), 4),
            "p99": round(percentile(ms, 99), 4), "mean": round(sum(ms) / len(ms), 4),
            "min": round(ms[0], 4), "max": round(ms[-1], 4)}


# ------------------------------------------------------------------------------------------------- running


def _check(raw: bytes, expect: dict, pb) -> bytes | None:
    """The raw logits of a well-formed answer, else None."""
    try:
        resp = pb.ModelInferResponse.FromString(raw)
    except Exception:  # noqa: BLE001 - any parse failure is a bad answer
        return None
    if len(resp.outputs) != 1 or resp.outputs[0].name != expect["output"]:
        return None
    if list(resp.outputs[0].shape) != list(expect["shape"]):
        return None
    n = math.prod(expect["shape"])
    if len(resp.raw_output_contents) == 1:
        data = resp.raw_output_contents[0]
        return data if len(data) == 4 * n else None
    values = resp.outputs[0].contents.fp32_contents
    return struct.pack(f"<{n}f", *values) if len(values) == n else None


async def run_point(target: str, blobs: list[bytes], expect: dict, concurrency: int, warmup_s: float,
                    duration_s: float, timeout_s: float, channels: str | int, server_pid: int | None,
                    keep_samples: int) -> dict:
    import grpc

    from splitinfer.protocol import grpc_service_pb2 as pb

    n_channels = concurrency if channels == "per-client" else max(1, min(int(channels), concurrency))
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               # one TCP connection per channel, as separate edge devices would have (gRPC otherwise shares
               # a subchannel between channels with equal arguments)
               ("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(n_channels)]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 30) for ch in chans))
        calls = [ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
                 for ch in chans]
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        samples: list[str] = []
        counts = {"sent": 0, "ok": 0}
        t_begin = time.perf_counter()
        inf = float("inf")
        window = {"from": inf, "to": inf}  # measurement window (perf_counter), set by the coordinator
        answered = [asyncio.Event() for _ in range(concurrency)]  # each client's first answer (or error)
        cpu: dict[str, float] = {}

        def cpu_sample(tag: str) -> None:
            cpu["lg" + tag], cpu["w" + tag], cpu["all" + tag] = (time.process_time(), time.perf_counter(),
                                                                 machine_busy_s())
            if server_pid:
                cpu["srv" + tag] = tree_cpu_s(server_pid)

        async def coordinator() -> None:
            # the window opens after the warm-up and once every client has had an answer (a full round of
            # the closed loop: the queues are in their steady state), and lasts duration_s
            await asyncio.sleep(warmup_s)
            await asyncio.gather(*(e.wait() for e in answered))
            cpu_sample("0")
            window["from"] = cpu["w0"]
            await asyncio.sleep(duration_s)
            cpu_sample("1")
            window["to"] = cpu["w1"]

        async def client(i: int) -> None:
            call = calls[i % n_channels]
            k = i
            while time.perf_counter() < window["to"]:
                blob = blobs[k % len(blobs)]
                k += 1
                counts["sent"] += 1
                t0 = time.perf_counter()
                try:
                    raw = await call(blob, timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    answered[i].set()
                    continue
                t1 = time.perf_counter()
                answered[i].set()
                logits = _check(raw, expect, pb)
                if logits is None:
                    errors["BAD_RESPONSE"] += 1
                    continue
                counts["ok"] += 1
                if window["from"] <= t1 <= window["to"]:
                    latencies.append(t1 - t0)
                    if len(samples) < keep_samples:
                        samples.append([(k - 1) % len(blobs), logits.hex()])

        await asyncio.gather(coordinator(), *(client(i) for i in range(concurrency)))
        drained_at = time.perf_counter()
    finally:
        for ch in chans:
            await ch.close()
    window_s = cpu["w1"] - cpu["w0"]
    out = {
        "concurrency": concurrency,
        "channels": n_channels,
        "window_s": round(window_s, 4),
        "requests_in_window": len(latencies),
        "throughput_rps": round(len(latencies) / window_s, 3) if window_s > 0 else None,
        "latency_ms": latency_summary(latencies),
        "sent": counts["sent"],
        "ok": counts["ok"],
        "errors": dict(errors),
        "warmup_s": round(cpu["w0"] - t_begin, 4),
        "drain_s": round(drained_at - cpu["w1"], 4),
        "loadgen_cpu_cores": round((cpu["lg1"] - cpu["lg0"]) / window_s, 4) if window_s > 0 else None,
        "samples": samples,
    }
    busy = cpu["all1"] - cpu["all0"]
    out["machine_busy_cores"] = round(busy / window_s, 4) if window_s > 0 and not math.isnan(busy) else None
    if server_pid:
        srv = cpu["srv1"] - cpu["srv0"]
        out["server_cpu_cores"] = round(srv / window_s, 4) if window_s > 0 else None
        out["server_cpu_ms_per_request"] = round(srv * 1e3 / len(latencies), 4) if latencies else None
        if out["machine_busy_cores"] is not None and window_s > 0:
            # what neither the server nor this load generator used: other work on the machine (noise)
            other = busy - srv - (cpu["lg1"] - cpu["lg0"])
            out["other_cpu_cores"] = round(max(0.0, other) / window_s, 4)
    return out


async def run_spec(spec: dict) -> dict:
    blobs = read_requests(Path(spec["requests"]))
    points = []
    for p in spec["points"]:
        res = await run_point(spec["target"], blobs, spec["expect"], int(p["concurrency"]), float(p["warmup_s"]),
                              float(p["duration_s"]), float(spec.get("timeout_s", 60.0)),
                              spec.get("channels", "per-client"), spec.get("server_pid"),
                              int(spec.get("keep_samples", 3)))
        print(f"loadgen: c={res['concurrency']:>3} {res['throughput_rps']} req/s p50 {res['latency_ms']['p50']} ms "
              f"p99 {res['latency_ms']['p99']} ms errors {res['errors'] or 0}", file=sys.stderr, flush=True)
        points.append(res)
    return {"target": spec["target"], "requests": len(blobs), "points": points}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = asyncio.run(run_spec(spec))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
