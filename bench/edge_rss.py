"""Benchmark: resident memory of a fresh edge agent serving the demo bundle.

``python -m bench.edge_rss --out FILE.json [--requests N] [--backend torch|onnx] [--bundle DIR] [--runs K]``

Setup, as ``splitinfer demo`` runs it (:mod:`splitinfer.cli.demo`):

* the bundle: ``--bundle DIR``, else ``WORKDIR/bundle`` when it loads, else planned there with the demo's call
  (:func:`partitioner.make.make_default_plan`, link ``DEMO_BANDWIDTH``/``DEMO_RTT``, device ``DEMO_DEVICE``,
  objective ``DEMO_OBJECTIVE``, ``splits="interior"``; ``--repeats`` profiling runs per stage, the demo's 30 by
  default; ~25 s here);
* the cloud server: ``python -m cloud_server serve --bundle B`` on a free loopback port
  (:func:`bench.serving.launch`: started, waited for until the model is ready, stopped as a process group);
* the edge agent: a fresh ``python -m edge_agent run --bundle B --server 127.0.0.1:P --host 127.0.0.1 --port E
  --device DEMO_DEVICE`` with ``SPLITINFER_EDGE_ADAPTIVE=false`` (as the demo) and
  ``SPLITINFER_EDGE_HEAD_BACKEND=--backend``, started as a :class:`splitinfer.daemons.Daemon` (own process group)
  and waited for on ``/readyz`` (:meth:`splitinfer.daemons.Daemon.wait_http_ready`). Every other ``SPLITINFER_EDGE_*`` /
  ``SPLITINFER_CLOUD_*`` variable of the caller's environment is removed; ``--agent-env KEY=VALUE`` adds
  variables to the agent's environment only (e.g. to try an allocator or torch setting) and is recorded;
* the load: ``--requests`` uploads, one at a time, of the Fashion-MNIST test images PNG-encoded as the demo
  does (:func:`splitinfer.cli.demo.encode_png`; image ``i % 10000``) to ``POST /v1/infer``;
* first ``--warmup-runs`` (default 1) agents that are started, sent ``WARMUP_REQUESTS`` uploads and stopped
  unmeasured, so every measured agent finds the same files in the page cache (see below).

Measured on the agent's process, from ``/proc/PID`` (nothing is asked of the agent itself):

* ``status``: ``VmRSS`` (resident now), ``VmHWM`` (peak resident since exec: the agent is exec'd fresh, so
  nothing of this driver's ~1 GB is inherited), ``RssAnon`` / ``RssFile`` / ``RssShmem``, ``VmSize``, ``Threads``;
* ``smaps_rollup`` when readable: ``Pss`` (resident shared pages divided by their sharers) and
  ``uss`` = ``Private_Clean + Private_Dirty`` (what ending the process would give back);
* ``smaps``: resident MB per mapped file (and anonymous memory), grouped into ``anon`` (heap and anonymous
  mappings: Python objects, tensors, malloc arenas, thread stacks), ``torch`` (``torch/lib``), ``cuda`` (NVIDIA
  and CUDA libraries of torch's CUDA build), ``onnxruntime``, ``python`` (extension modules and libpython) and
  ``other``, plus the largest single mappings.

at four points: ``after_ready`` (``/readyz`` answered 200), ``after_first_request``, ``after_requests`` (all
done) and, through the run, ``VmRSS`` every ``requests // 50`` requests (``rss_trace``). The headline figures
(``summary``): RSS after ready, peak (``VmHWM`` after the requests), RSS and PSS / USS at the end. With ``--runs
K`` the agent is started K times (fresh each time, same server) and the summary holds the medians.

File-backed RSS (``RssFile``: the mapped pages of torch's and the other shared libraries, ~60 % of the total with
torch's CUDA build) depends on the page cache: how much of a library a fault maps at once follows the size of the
cached folios, so the same agent can read tens of MB apart with its libraries freshly installed, hot, or evicted
and read back (this machine's kernel also pages out memory idle for about a minute). The warm-up agents make the
measured ones start from the same state; anonymous RSS and USS do not depend on it. Compare before/after runs
made the same way, and look at ``anon_final_mb`` / ``uss_final_mb`` beside the peak.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "onnx")
DEFAULT_REQUESTS = 500
DEFAULT_REPEATS = 30  # make_default_plan's default, which the demo uses
READY_TIMEOUT_S = 300.0  # the onnx backend exports its head at start-up
TRACE_POINTS = 50
TOP_MAPPINGS = 15
WARMUP_REQUESTS = 20
SUMMARY_POINTS = ("after_ready", "after_first_request", "after_requests")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- /proc


def _kb_fields(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, int]:
    """``Key:  N kB`` lines of a /proc file as ``{key: kB}`` (only ``keys`` when given)."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, sep, rest = line.partition(":")
        if not sep or (keys is not None and key not in keys):
            continue
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize", "VmSwap")


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _category(name: str) -> str:
    if name in ("[anon]", "[heap]") or name.startswith("[stack") or name.startswith("[anon:"):
        return "anon"
    if name.startswith("["):
        return "other"
    if "/torch/lib/" in name:
        return "torch"
    if "/nvidia/" in name or "/cuda/" in name or "/triton/" in name or "libcu" in name.rsplit("/", 1)[-1]:
        return "cuda"
    if "onnxruntime" in name:
        return "onnxruntime"
    if name.endswith(".so") and ("site-packages" in name or "lib-dynload" in name) or "libpython" in name \
            or ".cpython-" in name:
        return "python"
    return "other"


def smaps_breakdown(pid: int, top: int = TOP_MAPPINGS) -> dict | None:
    """Resident MB per mapped file (anonymous memory as ``[anon]``), grouped; None when smaps is unreadable."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    rss: collections.Counter[str] = collections.Counter()
    anon: collections.Counter[str] = collections.Counter()
    current = "[anon]"
    for line in text.splitlines():
        first, _, rest = line.partition(" ")
        if "-" in first and not first.endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            fields = line.split(None, 5)
            current = fields[5].strip() if len(fields) > 5 else "[anon]"
        elif first == "Rss:":
            rss[current] += int(rest.split()[0])
        elif first == "Anonymous:":
            anon[current] += int(rest.split()[0])
    groups: collections.Counter[str] = collections.Counter()
    for name, kb in rss.items():
        groups[_category(name)] += kb
    # anonymous (copy-on-write) pages of file mappings, e.g. relocated data of the shared libraries
    cow = sum(kb for name, kb in anon.items() if _category(name) != "anon")
    return {"rss_mb_by_group": {k: _mb(v) for k, v in groups.most_common()},
            "anon_in_file_mappings_mb": _mb(cow),
            "top_mappings": [{"mapping": name, "rss_mb": _mb(kb), "anon_mb": _mb(anon[name])}
                             for name, kb in rss.most_common(top)]}


def snapshot(pid: int, breakdown: bool = True) -> dict:
    """The agent's memory now, from /proc/PID (MB)."""
    base = Path(f"/proc/{pid}")
    status = _kb_fields(base / "status", STATUS_KEYS)
    threads = None
    for line in (base / "status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    out: dict = {k.lower() + "_mb": _mb(status.get(k)) for k in STATUS_KEYS}
    out["threads"] = threads
    try:
        roll = _kb_fields(base / "smaps_rollup")
    except OSError:
        roll = {}
    out["pss_mb"] = _mb(roll.get("Pss"))
    out["pss_anon_mb"] = _mb(roll.get("Pss_Anon"))
    out["pss_file_mb"] = _mb(roll.get("Pss_File"))
    out["uss_mb"] = (_mb(roll["Private_Clean"] + roll["Private_Dirty"])
                     if "Private_Clean" in roll and "Private_Dirty" in roll else None)
    if breakdown:
        out["smaps"] = smaps_breakdown(pid)
    return out


# ------------------------------------------------------------------------------------------------- bundle


def demo_bundle(path: Path, repeats: int, data_dir: str | None) -> Path:
    """Plan the embedded default into ``path`` with the demo's link, device, objective and splits."""
    from partitioner.cost import Link, parse_bandwidth, parse_duration
    from partitioner.make import make_default_plan
    from partitioner.search import Objective
    from splitinfer.cli import demo
    from splitinfer.energy import get_profile

    dev = get_profile(demo.DEMO_DEVICE)
    result = make_default_plan(path, Link(parse_bandwidth(demo.DEMO_BANDWIDTH), parse_duration(demo.DEMO_RTT)), dev,
                               dev.compute_slowdown, splits="interior", data_dir=data_dir, repeats=repeats,
                               objective=Objective.parse(*demo.DEMO_OBJECTIVE))
    return result.path


def resolve_bundle(args) -> tuple[Path, str]:
    from bench.serving import bundle_loads

    if args.bundle is not None:
        if not bundle_loads(args.bundle, "default"):
            raise SystemExit(f"--bundle {args.bundle} is not a loadable bundle of the default model")
        return args.bundle.resolve(), "given"
    cached = args.workdir / "bundle"
    if not args.rebuild and bundle_loads(cached, "default"):
        return cached.resolve(), "cached"
    _log(f"planning the default model as the demo does ({args.repeats} profiling runs per stage) ...")
    return demo_bundle(cached, args.repeats, args.data_dir).resolve(), f"planned here (repeats {args.repeats})"


def describe_bundle(path: Path) -> dict:
    from splitinfer.bundle import load_bundle

    plan = load_bundle(path).plan
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"path": str(path), "model": plan.model.name, "split": plan.split, "codec": plan.codec.name,
            "exits": [e.boundary for e in plan.exits], "active_exits": plan.active_exits,
            "files_mb": round(size / 2**20, 2)}


# ------------------------------------------------------------------------------------------------- run


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SPLITINFER_EDGE_", "SPLITINFER_CLOUD_"))} | {"PYTHONUNBUFFERED": "1"}


def agent_env(backend: str, extra: dict[str, str]) -> dict:
    return _clean_env() | {"SPLITINFER_EDGE_ADAPTIVE": "false", "SPLITINFER_EDGE_HEAD_BACKEND": backend} | extra


def run_agent(bundle: Path, grpc_port: int, backend: str, extra_env: dict[str, str], pngs: list[bytes],
              requests: int, log_path: Path) -> dict:
    """Start one fresh agent, measure it through ``requests`` uploads, stop it."""
    import httpx

    from splitinfer.cli import demo
    from splitinfer.daemons import Daemon, free_port

    port = free_port()
    args = [sys.executable, "-m", "edge_agent", "run", "--bundle", str(bundle), "--server", f"127.0.0.1:{grpc_port}",
            "--host", "127.0.0.1", "--port", str(port), "--device", demo.DEMO_DEVICE]
    agent = Daemon(args, name="edge agent", log_path=log_path, env=agent_env(backend, extra_env), cwd=ROOT,
                   new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        agent.wait_http_ready(f"{base}/readyz", timeout=READY_TIMEOUT_S)  # fails with the agent's log tail
        ready_s = time.perf_counter() - t0
        pid = agent.pid
        points = {"after_ready": snapshot(pid)}
        every = max(1, requests // TRACE_POINTS)
        trace: list[list[float]] = []
        outcomes: collections.Counter[str] = collections.Counter()
        failed = 0
        first_error = None
        with httpx.Client(timeout=60.0) as http:
            ready = http.get(f"{base}/readyz").json()
            for i in range(requests):
                r = http.post(f"{base}/v1/infer", files={"file": (f"{i}.png", pngs[i % len(pngs)], "image/png")})
                if r.status_code == 200:
                    body = r.json()
                    outcomes["degraded" if body.get("degraded") else str(body.get("decided_by"))] += 1
                else:
                    failed += 1
                    first_error = first_error or f"HTTP {r.status_code} {r.text[:200]}"
                if i == 0:
                    points["after_first_request"] = snapshot(pid)
                if (i + 1) % every == 0:
                    trace.append([i + 1, snapshot(pid, breakdown=False)["vmrss_mb"]])
        points["after_requests"] = snapshot(pid)
        if not agent.alive():
            raise RuntimeError(f"the agent exited ({agent.returncode}) during the run:\n{agent.log_tail()}")
    finally:
        agent.stop()
    return {"pid": pid, "ready_s": round(ready_s, 2), "server_up_at_ready": ready.get("server_up"),
            "split": ready.get("split"), "requests": requests, "failed": failed, "first_error": first_error,
            "answers": dict(sorted(outcomes.items())), "points": points, "rss_trace": trace,
            "exit_code": agent.returncode}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def summarize(backend: str, runs: list[dict]) -> dict:
    def med(point: str, key: str) -> float | None:
        return _median([r["points"][point][key] for r in runs if point in r["points"]])

    return {
        "backend": backend,
        "runs": len(runs),
        "requests_per_run": runs[0]["requests"] if runs else 0,
        "rss_after_ready_mb": med("after_ready", "vmrss_mb"),
        "rss_after_first_request_mb": med("after_first_request", "vmrss_mb"),
        "peak_rss_mb": med("after_requests", "vmhwm_mb"),
        "rss_final_mb": med("after_requests", "vmrss_mb"),
        "pss_after_ready_mb": med("after_ready", "pss_mb"),
        "pss_final_mb": med("after_requests", "pss_mb"),
        "uss_final_mb": med("after_requests", "uss_mb"),
        "anon_final_mb": med("after_requests", "rssanon_mb"),
        "file_final_mb": med("after_requests", "rssfile_mb"),
        "threads_final": med("after_requests", "threads"),
        "ready_s": _median([r["ready_s"] for r in runs]),
        "all_requests_ok": all(r["failed"] == 0 for r in runs),
        "server_up_at_ready": all(bool(r["server_up_at_ready"]) for r in runs),
    }


def table(summary: dict, runs: list[dict]) -> str:
    rows = [("backend", summary["backend"]),
            ("runs x requests", f"{summary['runs']} x {summary['requests_per_run']}")]
    for label, key in (("RSS after ready", "rss_after_ready_mb"),
                       ("RSS after 1st request", "rss_after_first_request_mb"), ("peak RSS (VmHWM)", "peak_rss_mb"),
                       ("RSS at end", "rss_final_mb"),
                       ("PSS after ready", "pss_after_ready_mb"), ("PSS at end", "pss_final_mb"),
                       ("USS at end", "uss_final_mb"), ("anon / file RSS at end", None)):
        if key is None:
            rows.append((label, f"{summary['anon_final_mb']} / {summary['file_final_mb']} MB"))
        else:
            rows.append((label, "n/a" if summary[key] is None else f"{summary[key]:.1f} MB"))
    last = runs[-1]["points"]["after_requests"].get("smaps") if runs else None
    if last:
        rows.append(("RSS by group at end", ", ".join(f"{k} {v}" for k, v in last["rss_mb_by_group"].items())))
        for m in last["top_mappings"][:8]:
            rows.append(("  " + m["mapping"].rsplit("/", 1)[-1], f"{m['rss_mb']} MB (anon {m['anon_mb']})"))
    rows.append(("ready after", f"{summary['ready_s']} s"))
    rows.append(("all requests ok", str(summary["all_requests_ok"])))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--agent-env wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="uploads per agent run")
    ap.add_argument("--backend", choices=BACKENDS, default="torch", help="the agent's head_backend")
    ap.add_argument("--runs", type=int, default=1, help="fresh agents, one after the other (summary: medians)")
    ap.add_argument("--warmup-runs", type=int, default=1, help="unmeasured agents started first (page cache)")
    ap.add_argument("--bundle", type=Path, default=None, help="an existing bundle of the default model")
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="profiling runs per stage when planning")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_edge_rss")
    ap.add_argument("--rebuild", action="store_true", help="plan the bundle again")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: SPLITINFER_FASHION_MNIST_DIR "
                                                     "or Debian's)")
    ap.add_argument("--agent-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment variable for the agent (repeatable)")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.runs < 1 or args.warmup_runs < 0:
        ap.error("--requests and --runs must be at least 1, --warmup-runs at least 0")
    extra_env = _parse_env(args.agent_env)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from bench.serving import launch, machine_info
    from splitinfer.cli import demo
    from splitinfer.daemons import free_port
    from splitinfer.data import load_fashion_mnist

    machine = machine_info()
    bundle, source = resolve_bundle(args)
    info = describe_bundle(bundle)
    _log(f"bundle {bundle} ({source}): split {info['split']}, codec {info['codec']}, exits {info['exits']}")
    test = load_fashion_mnist("test", args.data_dir)
    pngs = [demo.encode_png(test.images[i]) for i in range(min(args.requests, len(test)))]

    grpc_port = free_port()
    server = launch("splitinfer cloud serve",
                    [sys.executable, "-m", "cloud_server", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                     "--port", str(grpc_port), "--metrics-port", "0"],
                    _clean_env(), args.workdir / "cloud.log", ROOT, grpc_port, info["model"])
    runs: list[dict] = []
    try:
        for k in range(args.warmup_runs):
            _log(f"warm-up agent {k + 1}/{args.warmup_runs} (not measured) ...")
            run_agent(bundle, grpc_port, args.backend, extra_env, pngs, min(args.requests, WARMUP_REQUESTS),
                      args.workdir / f"edge-{args.backend}-warmup-{k}.log")
        for k in range(args.runs):
            _log(f"run {k + 1}/{args.runs}: fresh edge agent ({args.backend}), {args.requests} uploads ...")
            runs.append(run_agent(bundle, grpc_port, args.backend, extra_env, pngs, args.requests,
                                  args.workdir / f"edge-{args.backend}-{k}.log"))
    finally:
        server.stop()

    summary = summarize(args.backend, runs)
    out = {
        "summary": summary,
        "commit": machine["git"].get("commit"),
        "git": machine["git"],
        "settings": {
            "backend": args.backend, "requests": args.requests, "runs": args.runs,
            "warmup_runs": args.warmup_runs, "warmup_requests": min(args.requests, WARMUP_REQUESTS), "bundle": info,
            "bundle_source": source, "repeats": args.repeats if source.startswith("planned") else None,
            "agent_command": "python -m edge_agent run --bundle B --server 127.0.0.1:P --host 127.0.0.1 --port E "
                             f"--device {demo.DEMO_DEVICE}",
            "agent_env": {"SPLITINFER_EDGE_ADAPTIVE": "false", "SPLITINFER_EDGE_HEAD_BACKEND": args.backend,
                          **extra_env},
            "inputs": "Fashion-MNIST test images 0.. as PNG (splitinfer.cli.demo.encode_png), one upload at a time",
            "machine": machine,
        },
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary, runs))
    _log(f"wrote {args.out}")
    if not summary["all_requests_ok"]:
        _log(f"some requests failed: {[r['first_error'] for r in runs if r['failed']]}")
    return 0 if summary["all_requests_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
