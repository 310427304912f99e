"""PNG plots for ``splitinfer plan report`` (matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

from pathlib import Path

from splitinfer.bundle import Plan


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, grid and legend the axes, write the PNG and close the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rate_accuracy_plot(sweep: dict, path: Path) -> Path:
    """Bytes per sample (log) vs accuracy for every sweep point (PTQ and QAT) and the references."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("ptq", "o"), ("qat", "s")):
        pts = [(p[kind]["bytes_mean"], p[kind]["accuracy"], p) for p in sweep["points"] if kind in p]
        if pts:
            ax.scatter([b for b, _, _ in pts], [a for _, a, _ in pts], marker=marker, label=f"learned ({kind})")
            for b, a, p in pts:
                ax.annotate(f"b{p['boundary']} c{p['channels']} {p['bits']}bit", (b, a), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    for ref in sweep.get("references", []):
        ax.scatter([ref["bytes_mean"]], [ref["accuracy"]], marker="x", color="k")
        ax.annotate(f"{ref['codec']} @{ref['boundary']}", (ref["bytes_mean"], ref["accuracy"]), fontsize=6)
        ax.scatter([ref["fp32_bytes"]], [ref["reference_accuracy"]], marker="^", color="gray")
        ax.annotate(f"float32 @{ref['boundary']}", (ref["fp32_bytes"], ref["reference_accuracy"]), fontsize=6)
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, "bytes per offloaded sample", "top-1 accuracy (test)",
                 "rate vs accuracy of feature codecs (default model)")


def bytes_per_boundary_plot(plan: Plan, path: Path) -> Path:
    """float32 bytes and the planned payload bytes at every boundary (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    idx = [b.index for b in plan.boundaries]
    ax.semilogy(idx, [b.fp32_bytes for b in plan.boundaries], "o-", label="float32")
    by_codec: dict[str, list[tuple[int, int]]] = {}
    for e in plan.estimates:
        if e.bytes_per_offload:
            by_codec.setdefault(e.codec, []).append((e.split, e.bytes_per_offload))
    for name, pts in sorted(by_codec.items()):
        pts.sort()
        ax.semilogy([p[0] for p in pts], [p[1] for p in pts], "s" if len(pts) == 1 else "x-", label=name)
    return _save(plt, fig, ax, path, "boundary", "bytes per sample", f"bytes per boundary ({plan.model.name})")


def latency_vs_split_plot(plan: Plan, path: Path) -> Path:
    """Expected end-to-end latency of every split at several bandwidths (the plan's ``latency_curves``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in plan.latency_curves:
        ax.plot(c.splits, c.latency_ms, "o-", markersize=3, label=f"{c.bandwidth_bps / 1e6:g} Mbit/s")
        k = min(range(len(c.splits)), key=lambda i: c.latency_ms[i])
        ax.scatter([c.splits[k]], [c.latency_ms[k]], marker="*", s=120, color="k", zorder=3)
    n = plan.boundaries[-1].index
    ax.axvline(0, color="gray", lw=0.8, ls=":")
    ax.axvline(n, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rtt = plan.latency_curves[0].rtt_ms if plan.latency_curves else 0
    return _save(plt, fig, ax, path, f"split (0 = cloud-only, {n} = edge-only)",
                 "expected end-to-end latency (ms, log scale)",
                 f"latency vs split, {plan.model.name}, RTT {rtt:g} ms (* = best per bandwidth)")


def operating_point_map(plan: Plan, path: Path) -> Path:
    """The chosen split over the bandwidth x RTT grid (color), annotated with split, codec and latency."""
    import numpy as np

    plt = _pyplot()
    bws = sorted({p.bandwidth_bps for p in plan.operating_points})
    rtts = sorted({p.rtt_ms for p in plan.operating_points})
    grid = np.full((len(rtts), len(bws)), np.nan)
    fig, ax = plt.subplots(figsize=(0.95 * len(bws) + 2.5, 0.75 * len(rtts) + 2))
    n = plan.boundaries[-1].index
    for p in plan.operating_points:
        i, j = rtts.index(p.rtt_ms), bws.index(p.bandwidth_bps)
        grid[i, j] = p.split
        tag = "B" if p.codec == "bottleneck" else ""
        ax.text(j, i, f"{p.split}{tag}\n{p.expected_latency_ms:.3g} ms", ha="center", va="center", fontsize=7,
                color="white" if p.split < 0.5 * n else "black")  # readable on viridis' dark and light ends
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=n)
    fig.colorbar(im, ax=ax, label=f"split (0 = cloud-only, {n} = edge-only)")
    ax.set_xticks(range(len(bws)), [f"{b / 1e6:g}" for b in bws])
    ax.set_yticks(range(len(rtts)), [f"{r:g}" for r in rtts])
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel("round-trip time (ms)")
    ax.set_title(f"operating points, {plan.model.name} (B = learned bottleneck codec)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
