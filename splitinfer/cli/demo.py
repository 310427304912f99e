"""``splitinfer demo``: plan an embedded model (the default unless --model), start server and agent as processes,
stream the test set.

Everything real: the committed weights are planned for a link and device, the cloud server and the edge
agent run as separate processes on free loopback ports, each Fashion-MNIST test image is PNG-encoded and
uploaded to the agent's HTTP API, and the summary is computed from the answers and from both daemons'
Prometheus endpoints.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import typer

from splitinfer.daemons import Daemon, DaemonError, free_port

DEMO_BANDWIDTH = "5mbit"
DEMO_RTT = "20ms"
DEMO_DEVICE = "raspberry-pi-4"
DEMO_OBJECTIVE = ("weighted", "latency=1,energy=1")  # a battery-powered device: latency and energy count alike
OFFLOAD_STAGES = ("encode", "transfer")
# The server's queue + compute for cloud answers, or the device's own tail in a degraded fallback; 0 otherwise.
SOMETIMES_STAGES = ("tail",)


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 image as PNG bytes, as the demo uploads it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def parse_prometheus(text: str) -> dict[str, float]:
    """Flatten Prometheus text exposition into ``{'name{labels}': value}`` (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "count": len(values)}


def _overhead_ms(answer: dict) -> float:
    """The agent's own time in one answer: its total minus the stages it reports (head, exit, encode,
    transfer, tail)."""
    lat = answer.get("latency_ms", {})
    return max(0.0, float(lat.get("total", 0.0)) - sum(float(v) for k, v in lat.items() if k != "total" and v))


def summarize(answers: list[dict], labels: np.ndarray, full_pred: np.ndarray, feature_bytes_fp32: int,
              exits: list[int]) -> dict:
    """The demo summary from the agent's answers (one per request, in order)."""
    n = len(answers)
    pred = np.array([a["label"] for a in answers])
    decided = [a["decided_by"] for a in answers]
    degraded = sum(1 for a in answers if a.get("degraded"))
    offloaded = [a for a in answers if a["decided_by"] == "cloud"]
    per_exit = {str(b): round(sum(1 for d in decided if d == b) / max(1, n), 5) for b in exits}
    stages: dict[str, list[float]] = {}
    for a in answers:
        for stage, ms in a.get("latency_ms", {}).items():
            if ms is None or (stage in OFFLOAD_STAGES and a["decided_by"] != "cloud"):
                continue  # stages a request did not go through are not zero-latency samples
            if stage in SOMETIMES_STAGES and not ms:
                continue
            stages.setdefault(stage, []).append(float(ms))

    def energy(a: dict) -> float:
        e = a.get("energy_j", 0.0)
        return float(sum(e.values())) if isinstance(e, dict) else float(e)

    return {
        "requests": n,
        "accuracy": round(float((pred == labels[:n]).mean()), 5) if n else 0.0,
        "agreement": round(float((pred == full_pred[:n]).mean()), 5) if n else 0.0,
        "exit_rate": {"per_exit": per_exit, "total": round(sum(per_exit.values()), 5)},
        "offloaded": len(offloaded),
        "degraded": degraded,
        "bytes_per_offloaded": round(float(np.mean([a["bytes_sent"] for a in offloaded])), 1) if offloaded else 0.0,
        "feature_bytes_fp32": feature_bytes_fp32,
        "latency_ms": {k: _percentiles(v) for k, v in sorted(stages.items())},
        "agent_overhead_ms": _percentiles([_overhead_ms(a) for a in answers]) if n else {},
        "energy_j_per_request": round(float(np.mean([energy(a) for a in answers])), 6) if n else 0.0,
    }


def format_summary(s: dict) -> str:
    """The summary as a plain-text table."""
    rows = [
        ("requests", f"{s['requests']}"),
        ("split / codec", f"{s.get('split')} / {s.get('codec')}"),
        ("accuracy (labels)", f"{s['accuracy']:.4f}"),
        ("agreement (full model)", f"{s['agreement']:.4f}"),
        ("exit rate", f"{s['exit_rate']['total']:.1%}  " +
         ", ".join(f"exit@{b}: {r:.1%}" for b, r in s["exit_rate"]["per_exit"].items())),
        ("offloaded", f"{s['offloaded']}"),
        ("degraded", f"{s['degraded']}"),
        ("bytes per offloaded request",
         f"{s['bytes_per_offloaded']:.0f} (float32 features: {s['feature_bytes_fp32']} B)"),
        ("energy per request (model)", f"{s['energy_j_per_request'] * 1e3:.3f} mJ"),
    ]
    cal = s.get("exit_calibration")
    if cal:
        rates = ", ".join(f"exit@{b}: {r:.1%}" for b, r in cal["validation_exit_rates"].items()) or "none"
        rows.append(("exit calibration", f"{cal['mode']} ({cal['score']}): the exits' answers disagree with the "
                     f"full model's on <= {cal['epsilon']:g} of inputs with prob >= {1 - cal['delta']:.2f}; "
                     f"validation exit rates {rates}"))
        if cal.get("inactive_exits"):
            rows.append(("inactive exits", f"{cal['inactive_exits']} (not in the chosen exit subset)"))
    codec_agreement = s.get("codec_validation_agreement")
    if codec_agreement is not None:
        rows.append(("agreement not covered",
                     f"the {s.get('codec')} codec is outside that bound: alone it agrees with the full model on "
                     f"{codec_agreement:.4f} of validation images, so offloaded answers can disagree more"))
    for stage, p in s["latency_ms"].items():
        rows.append((f"latency {stage} (ms)", f"p50 {p['p50']:.2f}  p95 {p['p95']:.2f}  (n={p['count']})"))
    for k, v in s.get("metrics", {}).items():
        rows.append((f"metric {k}", f"{v:g}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan_demo_bundle(out: Path, bandwidth: str = DEMO_BANDWIDTH, rtt: str = DEMO_RTT, device: str = DEMO_DEVICE,
                     data_dir: str | None = None, model: str = "default"):
    """Plan the demo's bundle (an embedded model, the default unless ``model`` names another; interior splits,
    the demo's objective) into ``out``; returns the partitioner's ``PlanResult``."""
    from partitioner.cost import Link, parse_bandwidth, parse_duration
    from partitioner.make import make_default_plan
    from partitioner.search import Objective
    from splitinfer.energy import get_profile

    dev = get_profile(device)
    return make_default_plan(out, Link(parse_bandwidth(bandwidth), parse_duration(rtt)), dev, dev.compute_slowdown,
                             splits="interior", data_dir=data_dir, objective=Objective.parse(*DEMO_OBJECTIVE),
                             model=model)


def run_demo(requests: int = 10000, keep_running: bool = False, as_json: bool = False,
             workdir: Path = Path("runs/demo"), data_dir: str | None = None, bandwidth: str = DEMO_BANDWIDTH,
             rtt: str = DEMO_RTT, device: str = DEMO_DEVICE, progress: bool = True, model: str = "default") -> dict:
    """Run the demo end to end and return the summary dict."""
    import httpx
    import torch

    from partitioner.cost import parse_bandwidth, parse_duration
    from partitioner.report import split_table
    from splitinfer.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, render, to_model_input
    from splitinfer.energy import get_profile
    from splitinfer.progress import progress_bar

    def say(msg: str) -> None:
        if not as_json:
            typer.echo(msg)
        else:
            typer.echo(msg, err=True)

    from splitinfer.models import embedded_model

    side = embedded_model(model).size  # bad options fail before any work
    parse_bandwidth(bandwidth), parse_duration(rtt), get_profile(device)
    workdir.mkdir(parents=True, exist_ok=True)
    test = load_fashion_mnist("test", data_dir)
    if not 1 <= requests <= len(test):
        raise ValueError(f"--requests must be between 1 and {len(test)} (the test set's size), got {requests}")
    n = requests
    say(f"planning the embedded {model} model for {bandwidth}, RTT {rtt}, edge device {device}, objective "
        f"{DEMO_OBJECTIVE[0]} {DEMO_OBJECTIVE[1]} ...")
    result = plan_demo_bundle(workdir / "bundle", bandwidth, rtt, device, data_dir, model)
    say(split_table(result))
    plan = result.plan

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The daemons talk over loopback, not the planned link: an adaptive agent would measure loopback and
    # leave the planned operating point, so the demo pins it (adaptation is tested through the emulator).
    grpc_port, metrics_port, edge_port = free_port(), free_port(), free_port()
    server = agent = None
    try:
        server = Daemon(
            [sys.executable, "-m", "cloud_server", "serve", "--bundle", str(result.path), "--host", "127.0.0.1",
             "--port", str(grpc_port), "--metrics-port", str(metrics_port)],
            name="cloud server", log_path=workdir / "cloud.log", append=False, env=env)
        server.wait_grpc_ready(f"127.0.0.1:{grpc_port}")
        agent = Daemon(
            [sys.executable, "-m", "edge_agent", "run", "--bundle", str(result.path), "--server",
             f"127.0.0.1:{grpc_port}", "--host", "127.0.0.1", "--port", str(edge_port), "--device", device],
            name="edge agent", log_path=workdir / "edge.log", append=False,
            env={**env, "SPLITINFER_EDGE_ADAPTIVE": "false"})
        base = f"http://127.0.0.1:{edge_port}"
        agent.wait_http_ready(f"{base}/readyz")
        say(f"cloud server pid {server.pid} on 127.0.0.1:{grpc_port} (metrics :{metrics_port}); "
            f"edge agent pid {agent.pid} on {base}; logs in {workdir}")

        answers = []
        with httpx.Client(timeout=30.0) as http:
            for i in progress_bar(range(n), desc="requests", enabled=progress):
                r = http.post(f"{base}/v1/infer", files={"file": (f"{i}.png", encode_png(test.images[i]), "image/png")})
                if r.status_code != 200:
                    raise RuntimeError(f"request {i} failed: HTTP {r.status_code} {r.text[:200]}")
                answers.append(r.json())
            edge_metrics = parse_prometheus(http.get(f"{base}/metrics").text)
            cloud_metrics = parse_prometheus(http.get(f"http://127.0.0.1:{metrics_port}/metrics").text)

        with torch.inference_mode():
            # the agent resizes each 28x28 upload to the model's input size exactly as render() does
            x = to_model_input(render(test.images[:n], side), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
            from splitinfer.bundle import load_bundle

            staged = load_bundle(result.path).staged
            full_pred = torch.cat([staged(x[i : i + 1000]).argmax(1) for i in range(0, n, 1000)]).numpy()
        on_device = [e.boundary for e in plan.exits if e.boundary <= plan.split]
        active = on_device if plan.active_exits is None else sorted(plan.active_exits)
        summary = summarize(answers, test.labels, full_pred, plan.boundaries[plan.split].fp32_bytes, active)
        summary["split"] = plan.split
        cal = plan.exit_calibration
        if cal is not None:
            rates = plan.active_exit_rates if plan.active_exit_rates is not None else cal.exit_rates
            summary["exit_calibration"] = {
                "mode": cal.mode, "score": cal.score, "epsilon": cal.epsilon, "delta": cal.delta,
                "upper_bound": cal.upper_bound,
                "validation_exit_rates": {str(b): r for b, r in sorted(rates.items()) if b in active},
                "inactive_exits": [b for b in on_device if b not in active],
                "calibration_samples": cal.n_path + cal.n_test,
            }
        summary["codec"] = plan.codec.name
        learned = plan.learned_codec_at(plan.split)
        if learned is not None and plan.codec.name == learned.name:
            agreement = plan.notes.get(f"learned_codec_{plan.split}_validation_agreement",
                                       plan.notes.get("learned_codec_validation_agreement"))  # older plans
            summary["codec_validation_agreement"] = float(agreement) if agreement is not None else None
        summary["bundle"] = str(result.path)
        summary["metrics"] = {
            "edge bytes sent total": sum(v for k, v in edge_metrics.items()
                                         if k.startswith("splitinfer_edge_bytes_sent_total")),
            "edge energy joules total": sum(v for k, v in edge_metrics.items()
                                            if k.startswith("splitinfer_edge_energy_joules_total")),
            "cloud requests total": sum(v for k, v in cloud_metrics.items()
                                        if k.startswith("splitinfer_server_requests_total")),
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
        else:
            typer.echo("")
            typer.echo(format_summary(summary))
        if keep_running:
            say(f"--keep-running: edge agent at {base} (POST /v1/infer), cloud server at 127.0.0.1:{grpc_port}; "
                "Ctrl-C to stop")
            try:
                while server.alive() and agent.alive():
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        for daemon in (agent, server):
            if daemon is not None:
                daemon.stop(timeout=20.0)


def demo_command(
    requests: int = typer.Option(10000, min=1, max=10000,
                                 help="number of Fashion-MNIST test images to send (1 to 10,000)"),
    keep_running: bool = typer.Option(False, help="leave the server and agent up after the summary"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    workdir: Path = typer.Option(Path("runs/demo"), help="where the bundle and logs go"),
    data_dir: str = typer.Option(None, envvar="SPLITINFER_FASHION_MNIST_DIR", help="Fashion-MNIST IDX folder"),
    bandwidth: str = typer.Option(DEMO_BANDWIDTH, help="link bandwidth to plan for"),
    rtt: str = typer.Option(DEMO_RTT, help="link RTT to plan for"),
    device: str = typer.Option(DEMO_DEVICE, help="edge device profile to plan for"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    model: str = typer.Option("default", help="embedded model: default (28x28 CNN), mobilenet_v2_fmnist "
                                              "(MobileNetV2 at 64x64; the test images are sent as 28x28 PNGs "
                                              "and the agent resizes them) or vit_fmnist (a small vision "
                                              "transformer at 28x28, split between encoder blocks)"),
) -> None:
    """Run the whole system on an embedded model (the default unless --model) and print a summary."""
    from splitinfer.errors import SplitInferError

    try:
        run_demo(requests, keep_running, as_json, workdir, data_dir, bandwidth, rtt, device, progress, model)
    except (SplitInferError, ValueError) as exc:  # bad options or data: the message says what to do
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except DaemonError as exc:  # a daemon failed to start: its log says more
        typer.echo(f"error: {exc.headline} (logs in {workdir})", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as exc:  # a request failed: the logs say more
        typer.echo(f"error: {exc} (logs in {workdir})", err=True)
        raise typer.Exit(1) from None
