"""The edge side of the link benchmarks, as its own process (so it can run in a CPU-limited cgroup, i.e. as a
slower device): the real :class:`edge_agent.runtime.EdgeRuntime` on a bundle, driven by JSON lines on stdin.

Commands (one JSON object per line; one JSON answer per line on stdout):

* ``{"cmd": "profile", "repeats": R}``: profile the bundle's model here (1 thread) -> the profile dict
* ``{"cmd": "connect", "address": "HOST:PORT"}``: (re)build the runtime against a server address
* ``{"cmd": "set", "split": k, "codec": c, "exits": [...], "thresholds": {boundary: t}}``: switch the operating
  point; ``thresholds`` (optional) replace those exits' thresholds from the bundle's plan until the next ``set``
  (``bench.joint`` runs each configuration with the thresholds its search assumed)
* ``{"cmd": "run", "n": N, "warmup": W, "offset": O}``: answer inputs ``O..O+N-1`` (cycling; ``O`` 0 unless
  given) -> wall ms per request, latency parts, flags
* ``{"cmd": "overhead", "n": N}``: edge-only with every exit: the median over requests of wall time minus the
  profiled cost of the path the request took (stages up to where it was answered, plus the exits evaluated)
* ``{"cmd": "quit"}``

Added for ``bench.e2e`` (named runtimes next to the one above, each with its own settings and client):

* ``{"cmd": "load", "bundle": DIR}``: load another bundle (same inputs); closes every runtime
* ``{"cmd": "open", "name": N, "address": A, "settings": {...}, "prober": bool}``: a runtime ``N`` built with
  these EdgeSettings fields; ``prober`` runs the agent's idle-link prober beside it (as ``edge_agent.app`` does:
  every ``min(1 s, probe_interval_s)``, ``probe_link()`` when ``needs_probe()``)
* ``{"cmd": "op", "name": N, "split": k, "codec": c, "exits": [...]}``: set runtime ``N``'s operating point
* ``{"cmd": "pause", "name": N, "paused": bool}``: pause / resume runtime ``N``'s prober (on resume, the probe
  an idle agent would have made meanwhile, if one is due, runs first)
* ``{"cmd": "ready", "name": N}``: ``probe_server()`` (the agent's start-up check; not a link observation)
* ``{"cmd": "probe", "name": N}``: one ``probe_link()`` now
* ``{"cmd": "requests", "name": N, "indices": [...], "warmup": W, "raw": bool}``: answer those inputs -> one
  record each; with ``raw`` each request also carries the file a user would upload (``--file-format``: PNG for
  grey inputs and JPEG quality 90 for colour, or the smaller of the two), as ``edge_agent.app`` passes it
  (``infer(raw=...)``: the ``image`` operating point forwards it); ``warmup`` and ``trace`` take ``raw`` too
* ``{"cmd": "warmup", "name": N, "indices": [...], "min_s": S, "max_s": M, "stable_n": K, "max_n": R}``:
  requests (cycling over ``indices``) until the operating point has stayed the same for the last ``K`` requests
  and ``min_s`` have passed (or ``max_s`` / ``max_n``)
* ``{"cmd": "trace", "name": N, "indices": [...], "duration_s": D}``: requests back to back for ``D`` seconds;
  records carry ``time.monotonic()`` start times (comparable across processes) and the link estimate
* ``{"cmd": "cloud", "address": A, "indices": [...], "fmt": "png"|"jpeg"|"smaller", "quality": Q, "timeout_s": T,
  "warmup": W, "keep_open": false}``: cloud-only as a user sends it: encode the pixels (``--pixels``) as PNG/JPEG
  and call the server's ``image`` codec at split 0 -> one record each (energy from the device power model); with
  ``keep_open`` the channel stays open for the next call with the same address (else one channel per call)
* ``{"cmd": "status", "name": N}``, ``{"cmd": "close", "name": N}``

Inputs: the Fashion-MNIST test images (rendered at the input size) for an embedded model, seeded random tensors
otherwise; or, with
``--pixels FILE.npy`` (uint8 ``[N, H, W]`` or ``[N, H, W, 3]``), those images normalised with the plan's input
spec (the ``cloud`` command encodes the same pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from splitinfer.gc_freeze import freeze_loaded


def _inputs(bundle, n: int) -> torch.Tensor:
    from splitinfer.models import EMBEDDED_MODELS

    if bundle.plan.model.name in EMBEDDED_MODELS:  # trained on Fashion-MNIST: its test images, rendered
        from splitinfer.data import load_fashion_mnist, render, to_model_input

        test = load_fashion_mnist("test")
        side = int(bundle.plan.input.shape[-1])
        return to_model_input(render(test.images[:n], side), bundle.plan.input.mean, bundle.plan.input.std)
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *bundle.plan.input.shape, generator=g)


def _pixel_inputs(bundle, pixels: np.ndarray) -> torch.Tensor:
    from splitinfer.data import to_model_input

    return to_model_input(pixels, bundle.plan.input.mean, bundle.plan.input.std)


# ---------------------------------------------------------------------------------------------- bench.e2e

E2E_COMMANDS = ("load", "open", "op", "pause", "ready", "probe", "requests", "warmup", "trace", "cloud", "status",
                "close")


class _Named:
    """A runtime built for ``bench.e2e``, with the agent's idle-link prober beside it (optional) and counters of
    the probes it sent."""

    def __init__(self, bundle, bundle_dir: Path, address: str, settings: dict, prober: bool):
        from edge_agent.metrics import EdgeMetrics
        from edge_agent.runtime import EdgeRuntime
        from edge_agent.settings import EdgeSettings
        from edge_agent.transport import CloudClient

        self.settings = EdgeSettings(bundle=bundle_dir, server=address, **settings)
        client = CloudClient(address, bundle.plan.model.name, timeout_s=self.settings.timeout_s)
        self.probes = {"rtt": 0, "transfer": 0, "transfer_bytes": 0}
        rtt, transfer = client.probe_rtt, client.probe_transfer

        def probe_rtt() -> float:
            self.probes["rtt"] += 1
            return rtt()

        def probe_transfer(nbytes: int) -> tuple[int, float]:
            out = transfer(nbytes)
            self.probes["transfer"] += 1
            self.probes["transfer_bytes"] += int(out[0])
            return out

        client.probe_rtt, client.probe_transfer = probe_rtt, probe_transfer  # counted, same calls
        self.runtime = EdgeRuntime(bundle, client, self.settings, metrics=EdgeMetrics())
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if prober:
            self._thread = threading.Thread(target=self._probe_when_idle, name="e2e-prober", daemon=True)
            self._thread.start()

    def _probe_when_idle(self) -> None:
        """``edge_agent.app``'s prober: the runtime's link controller ticks every ``period_s`` (unless paused)."""
        links = self.runtime.links
        while not self._stop.wait(links.period_s):
            if not self.paused.is_set():
                links.tick()

    def op(self) -> list:
        rt = self.runtime
        return [rt.split, rt.codec_name, list(rt.head_exits)]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.runtime.close()


def with_thresholds(plan, thresholds: dict | None):
    """The plan's exit policy with ``thresholds`` (boundary -> threshold; JSON keys are strings) replacing the
    plan's for those exits; the plan's own policy when None. A boundary the plan has no exit at is refused."""
    from splitinfer.head import ExitPolicy

    base = ExitPolicy.from_plan(plan)
    if not thresholds:
        return base
    given = {int(b): float(t) for b, t in thresholds.items()}
    unknown = sorted(set(given) - set(base.thresholds))
    if unknown:
        raise ValueError(f"thresholds for exits {unknown} the bundle does not have ({sorted(base.thresholds)})")
    return ExitPolicy({**base.thresholds, **given}, base.scores)


def _record(named: _Named, res, t0: float, wall_ms: float, op_before: list) -> dict:
    rt = named.runtime
    return {"t": round(t0, 6), "wall_ms": round(wall_ms, 4), "label": int(res.label),
            "decided_by": res.decided_by, "degraded": bool(res.degraded), "outcome": res.outcome,
            "op": op_before, "op_after": named.op(), "bytes_sent": int(res.bytes_sent),
            "bytes_received": int(res.bytes_received),
            "energy_j": {k: float(v) for k, v in res.energy_j.items()},
            "latency_ms": {k: float(v) for k, v in res.latency_ms.items()},
            "bw_bps": rt.link.bandwidth_bps, "rtt_s": rt.link.rtt_s}


class _Files:
    """The file a user would upload for input ``i``, made once per input; passed to ``EdgeRuntime.infer(raw=...)``
    as the agent's HTTP API does. ``fmt``: ``png``, ``jpeg`` (quality 90) or ``smaller`` (whichever of the two is
    smaller for that input); ``auto`` (default): PNG for grey inputs, JPEG for colour."""

    def __init__(self) -> None:
        self.cache: dict[int, bytes] = {}
        self.spec = None
        self.fmt = "auto"

    def reset(self, bundle, fmt: str = "auto") -> None:
        self.cache.clear()
        self.spec = bundle.plan.input
        self.fmt = fmt

    def fmt_for(self, spec, fmt: str) -> str:
        """``auto`` resolved for ``spec`` (PNG for grey, JPEG for colour); other formats unchanged."""
        if fmt != "auto":
            return fmt
        return "png" if int(spec.shape[0]) == 1 else "jpeg"

    def get(self, pixels: np.ndarray | None, i: int) -> bytes | None:
        if pixels is None or self.spec is None:
            return None
        if i not in self.cache:
            self.cache[i] = encode_file(self.spec, pixels[i], self.fmt_for(self.spec, self.fmt))[0]
        return self.cache[i]


def encode_file(spec, pixels: np.ndarray, fmt: str, quality: int = 90) -> tuple[bytes, dict]:
    """``pixels`` as a PNG or JPEG file (``fmt`` ``png``/``jpeg``), or as whichever of the two is smaller
    (``smaller``: both are encoded)."""
    from splitinfer.imaging import ImageCodec

    if fmt == "smaller":
        return min((ImageCodec(spec, fmt=f, quality=quality).encode(pixels) for f in ("png", "jpeg")),
                   key=lambda out: len(out[0]))
    return ImageCodec(spec, fmt=fmt, quality=quality).encode(pixels)


FILES = _Files()


def _serve_one(named: _Named, inputs: torch.Tensor, i: int, rid: str, raw: bytes | None = None) -> dict:
    op_before = named.op()
    t0 = time.monotonic()
    p0 = time.perf_counter()
    res = named.runtime.infer(inputs[i : i + 1], rid, raw=raw) if raw is not None else \
        named.runtime.infer(inputs[i : i + 1], rid)
    rec = _record(named, res, t0, (time.perf_counter() - p0) * 1e3, op_before)
    rec["index"] = i
    return rec


CLOUD_CLIENTS: dict[tuple, object] = {}  # the cloud command's kept-open clients (``keep_open``)


def _cloud_only(msg: dict, bundle, pixels: np.ndarray | None) -> dict:
    """Cloud-only as a user sends it: PNG/JPEG of the pixels to the server's ``image`` codec at split 0.

    Latency: encode + call + argmax (wall). Energy: the device power model the runtime uses, with the same
    accounting (compute: CPU time of the edge's own work before the call, here the encoding; radio: bytes sent
    and the network time, i.e. the round trip minus the server's queue and compute time)."""
    from edge_agent.transport import CloudClient
    from splitinfer.energy import DEFAULT_DEVICE, get_profile
    from splitinfer.imaging import ImageCodec

    if pixels is None:
        raise ValueError("the cloud command needs --pixels")
    fmt = FILES.fmt_for(bundle.plan.input, msg.get("fmt", "png"))
    quality = int(msg.get("quality", 90))
    indices = [int(i) for i in msg["indices"]]
    if fmt == "smaller":  # which format each input's file takes is known before the clock starts
        formats = {i: encode_file(bundle.plan.input, pixels[i], "smaller", quality)[1]["format"] for i in indices}
    else:
        formats = dict.fromkeys(indices, fmt)
    codecs = {f: ImageCodec(bundle.plan.input, fmt=f, quality=quality) for f in set(formats.values())}
    profile = get_profile(msg.get("device", DEFAULT_DEVICE))
    records = []
    key = (msg["address"], bundle.plan.model.name, float(msg.get("timeout_s", 60.0)))
    if msg.get("keep_open"):  # one channel for every call with these settings, as a user's client keeps it
        if key not in CLOUD_CLIENTS:
            CLOUD_CLIENTS[key] = CloudClient(key[0], key[1], timeout_s=key[2])
        context = contextlib.nullcontext(CLOUD_CLIENTS[key])
    else:
        context = CloudClient(key[0], key[1], timeout_s=key[2])
    with context as client:
        warm = int(msg.get("warmup", 0))
        for j, i in enumerate(indices[:warm] + indices):
            t0 = time.monotonic()
            p0 = time.perf_counter()
            c0 = time.thread_time()
            payload, meta = codecs[formats[i]].encode(pixels[i])
            cpu_s = time.thread_time() - c0
            encode_ms = (time.perf_counter() - p0) * 1e3
            res = client.infer_features(payload, meta, 0, "image", f"c{j}")
            label = int(np.argmax(res.logits[0]))
            wall_ms = (time.perf_counter() - p0) * 1e3
            if j < warm:
                continue
            server_s = (res.server_queue_ms + res.server_compute_ms) / 1e3
            network_s = max(res.round_trip_s - server_s, 1e-6)
            records.append({"t": round(t0, 6), "wall_ms": round(wall_ms, 4), "label": label, "index": i,
                            "decided_by": "cloud", "degraded": False, "outcome": "cloud", "op": [0, "image", []],
                            "bytes_sent": int(res.bytes_sent), "bytes_received": int(res.bytes_received),
                            "payload_bytes": len(payload),
                            "energy_j": {"compute": profile.compute_joules(cpu_s),
                                         "radio": profile.radio_joules(int(res.bytes_sent), network_s)},
                            "latency_ms": {"encode": round(encode_ms, 4),
                                           "transfer": round(res.round_trip_s * 1e3, 4),
                                           "server": round(server_s * 1e3, 4), "total": round(wall_ms, 4)}})
    return {"ok": True, "records": records}


def _e2e_command(cmd: str, msg: dict, bundle, bundle_dir: Path, inputs: torch.Tensor,
                 pixels: np.ndarray | None, named: dict[str, _Named]) -> dict:
    if cmd == "cloud":
        return _cloud_only(msg, bundle, pixels)
    name = msg.get("name", "main")
    if cmd == "open":
        if name in named:
            named.pop(name).close()
        named[name] = _Named(bundle, bundle_dir, msg["address"], dict(msg.get("settings", {})),
                             bool(msg.get("prober", False)))
        freeze_loaded()  # as the agent does once its runtime is built
        return {"ok": True, "op": named[name].op()}
    item = named[name]
    rt = item.runtime
    if cmd == "close":
        named.pop(name).close()
        return {"ok": True}
    if cmd == "op":
        rt.set_operating_point(int(msg["split"]), msg.get("codec"), msg.get("exits"))
        return {"ok": True, "op": item.op()}
    if cmd == "pause":
        if msg.get("paused", True):
            item.paused.set()
            return {"ok": True}
        # Resuming: while paused the agent stood idle (the other configurations ran), and an idle agent probes
        # when a probe is due; make that probe now, before its next requests, rather than let the prober's next
        # tick collide with them on the link.
        probed = bool(rt.needs_probe() and rt.probe_link())
        item.paused.clear()
        return {"ok": True, "probed": probed}
    if cmd == "ready":  # what the agent does at start-up (edge_agent.app's lifespan): connects the channel
        return {"ok": True, "ready": bool(rt.probe_server())}
    if cmd == "probe":
        return {"ok": True, "probed": bool(rt.probe_link()), "op": item.op(),
                "bw_bps": rt.link.bandwidth_bps, "rtt_s": rt.link.rtt_s}
    if cmd == "status":
        return {"ok": True, "status": json.loads(json.dumps(rt.status(), default=str)), "probes": item.probes,
                "op": item.op()}
    indices = [int(i) for i in msg.get("indices", [])]
    with_raw = bool(msg.get("raw", False))
    if with_raw and FILES.spec is None:
        FILES.reset(bundle, FILES.fmt)

    def raw(i: int) -> bytes | None:
        return FILES.get(pixels, i) if with_raw else None

    if cmd == "requests":
        warm = int(msg.get("warmup", 0))
        for j in range(warm):
            i = indices[j % len(indices)]
            _serve_one(item, inputs, i, "warmup", raw(i))
        return {"ok": True, "records": [_serve_one(item, inputs, i, f"r{i}", raw(i)) for i in indices]}
    if cmd == "warmup":
        min_s, max_s = float(msg.get("min_s", 6.0)), float(msg.get("max_s", 60.0))
        stable_n, max_n = int(msg.get("stable_n", 5)), int(msg.get("max_n", 100_000))
        t_start = time.monotonic()
        records: list[dict] = []
        ops: list[list] = []
        j = 0
        while True:
            i = indices[j % len(indices)]
            rec = _serve_one(item, inputs, i, f"w{j}", raw(i))
            j += 1
            ops.append(rec["op_after"])
            keep = len(records) < 2000  # the first ones (the op changes are all there)
            if keep or rec["op_after"] != rec["op"]:
                records.append(rec)
            elapsed = time.monotonic() - t_start
            stable = len(ops) >= stable_n and all(o == ops[-1] for o in ops[-stable_n:])
            if (elapsed >= min_s and stable) or elapsed >= max_s or j >= max_n:
                break
        return {"ok": True, "n": j, "seconds": round(time.monotonic() - t_start, 3), "stable": stable,
                "op": item.op(), "switches": rt.selector.switches if rt.selector else 0,
                "changes": [{"t": r["t"], "from": r["op"], "to": r["op_after"], "bw_bps": r["bw_bps"],
                             "rtt_s": r["rtt_s"]} for r in records if r["op"] != r["op_after"]],
                "bw_bps": rt.link.bandwidth_bps, "rtt_s": rt.link.rtt_s}
    if cmd == "trace":
        duration = float(msg["duration_s"])
        t_end = time.monotonic() + duration
        records = []
        j = 0
        while time.monotonic() < t_end:
            i = indices[j % len(indices)]
            records.append(_serve_one(item, inputs, i, f"t{j}", raw(i)))
            j += 1
        return {"ok": True, "records": records}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--pixels", type=Path, default=None, help="uint8 images (.npy) to use as inputs")
    ap.add_argument("--file-format", default="auto", choices=("auto", "png", "jpeg", "smaller"),
                    help="the file a user uploads (requests with raw): auto = PNG for grey, JPEG q90 for colour; "
                         "smaller = whichever of PNG and JPEG q90 is smaller for each input")
    ap.add_argument("--log-level", default="warning", help="log level of the runtime's loggers (to stderr)")
    args = ap.parse_args(argv)
    FILES.fmt = args.file_format
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from edge_agent.metrics import EdgeMetrics
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from edge_agent.transport import CloudClient
    from splitinfer.allocator import tune_allocator
    from splitinfer.bundle import load_bundle

    tune_allocator()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    pixels = np.load(args.pixels) if args.pixels is not None else None
    inputs = _inputs(bundle, args.inputs) if pixels is None else _pixel_inputs(bundle, pixels)
    runtime: EdgeRuntime | None = None
    named: dict[str, _Named] = {}
    stage_ms: list[float] = []
    exit_ms: dict[int, float] = {}

    def connect(address: str) -> EdgeRuntime:
        client = CloudClient(address, bundle.plan.model.name, timeout_s=120.0)
        settings = EdgeSettings(bundle=args.bundle, server=address, timeout_s=120.0)
        return EdgeRuntime(bundle, client, settings, metrics=EdgeMetrics())

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "quit":
                break
            if cmd == "profile":
                from partitioner.profile import profile_model

                prof = profile_model(bundle.staged, bundle.exits, bundle.codec_for("uint8-affine", 0),
                                     inputs[:1], repeats=int(msg.get("repeats", 30)), threads=1,
                                     model_name=bundle.plan.model.name)
                stage_ms = list(prof.stage_ms)
                exit_ms = dict(prof.exit_ms)
                answer({"ok": True, "profile": prof.to_dict()})
            elif cmd == "connect":
                if runtime is not None:
                    runtime.close()
                runtime = connect(msg["address"])
                answer({"ok": True})
            elif cmd == "set":
                runtime.set_operating_point(int(msg["split"]), msg.get("codec"), msg.get("exits"))
                runtime.policy = with_thresholds(runtime.plan, msg.get("thresholds"))
                answer({"ok": True})
            elif cmd == "run":
                n, warmup, offset = int(msg["n"]), int(msg.get("warmup", 2)), int(msg.get("offset", 0))
                for i in range(warmup):
                    runtime.infer(inputs[i : i + 1], "warmup")
                walls, degraded = [], 0
                for i in range(n):
                    j = (offset + i) % len(inputs)
                    t0 = time.perf_counter()
                    res = runtime.infer(inputs[j : j + 1], f"r{i}")
                    walls.append((time.perf_counter() - t0) * 1e3)
                    degraded += bool(res.degraded)
                answer({"ok": True, "wall_ms": walls, "degraded": degraded})
            elif cmd == "overhead":
                n = int(msg.get("n", 30))
                if runtime is None:
                    runtime = connect("127.0.0.1:1")  # edge-only requests never call the server
                n_stages = bundle.staged.num_stages
                runtime.set_operating_point(n_stages, exits=sorted(bundle.exits))
                for i in range(3):
                    runtime.infer(inputs[i : i + 1], "warmup")
                extra = []
                for i in range(n):
                    t0 = time.perf_counter()
                    res = runtime.infer(inputs[i % len(inputs) : i % len(inputs) + 1], f"o{i}")
                    wall = (time.perf_counter() - t0) * 1e3
                    upto = res.decided_by if isinstance(res.decided_by, int) else n_stages
                    path = sum(stage_ms[:upto]) + sum(v for b, v in exit_ms.items() if b <= upto)
                    extra.append(wall - path)
                answer({"ok": True, "overhead_ms": statistics.median(extra)})
            elif cmd in E2E_COMMANDS:
                if cmd == "load":
                    for item in named.values():
                        item.close()
                    named.clear()
                    if runtime is not None:
                        runtime.close()
                        runtime = None
                    args.bundle = Path(msg["bundle"])
                    bundle = load_bundle(args.bundle)
                    FILES.reset(bundle, FILES.fmt)
                    inputs = _inputs(bundle, args.inputs) if pixels is None else _pixel_inputs(bundle, pixels)
                    answer({"ok": True})
                else:
                    answer(_e2e_command(cmd, msg, bundle, args.bundle, inputs, pixels, named))
            else:
                answer({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:  # report to the driver, keep serving
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for item in named.values():
        item.close()
    if runtime is not None:
        runtime.close()


if __name__ == "__main__":
    main()
