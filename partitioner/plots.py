"""PNG plots for ``splitinfer plan report`` (matplotlib's Agg canvas; nothing is shown on screen).

Each plot has a ``*_figure`` function that builds and returns the :class:`~matplotlib.figure.Figure` (for tests
and notebooks) and a ``*_plot``/``*_map`` function that writes it as a PNG. Figures are created without
``pyplot``: no global backend switch and no figure registry to leak into.

Axes that count something (boundary, split) have integer ticks only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from splitinfer.bundle import Plan

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
# one marker shape per bit width of a codec sweep (in the order of the sweep's distinct bit widths)
BIT_MARKERS = ("o", "s", "D", "v", "p", "h", "P", "<", ">", "8")
# one colour family per boundary of a codec sweep; shades within it tell the channel counts apart
BOUNDARY_COLORMAPS = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")


def _figure(figsize: tuple[float, float], layout: str | None = None) -> Figure:
    """A figure on an Agg canvas (``fig.canvas.get_renderer()`` works for measuring text)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(axis) -> None:
    """Major ticks at integers only (``axis``: an ``ax.xaxis`` / ``ax.yaxis``)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _finish(fig: Figure, ax: Axes, xlabel: str, ylabel: str, title: str) -> Figure:
    """Label, grid and legend the axes and lay the figure out."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _write(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def rate_accuracy_figure(sweep: dict) -> Figure:
    """Bytes per sample (log) vs accuracy of every sweep point (PTQ and QAT) and of the references.

    Points are not labelled one by one (close points made such labels overlap): the colour family is the
    boundary and its shade the channel count, the marker shape is the bit width, a solid line with filled
    markers joins the QAT results of one (boundary, channels) in bit order, a dashed one with hollow markers
    the PTQ-only results. The references (uint8-affine and float32 at each boundary) are crosses and stars
    in their boundary's colour (white where boundaries of one shape put them at the same place). One legend,
    right of the axes and inside the figure, explains all of it.
    """
    import matplotlib
    from matplotlib.lines import Line2D

    points = sweep.get("points", [])
    refs = sweep.get("references", [])
    boundaries = sorted({p["boundary"] for p in points} | {r["boundary"] for r in refs})
    groups = sorted({(p["boundary"], p["channels"]) for p in points})
    bit_marker = {q: BIT_MARKERS[i % len(BIT_MARKERS)] for i, q in enumerate(sorted({p["bits"] for p in points}))}

    def shade(b: int, i: int, n: int):
        cmap = matplotlib.colormaps[BOUNDARY_COLORMAPS[boundaries.index(b) % len(BOUNDARY_COLORMAPS)]]
        return cmap(0.95 if n <= 1 else 0.45 + 0.5 * i / (n - 1))

    color = {}
    for b in boundaries:
        chans = [c for bb, c in groups if bb == b]
        for i, c in enumerate(chans):
            color[(b, c)] = shade(b, i, len(chans))

    fig = _figure((9.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for g in groups:
        c = color[g]
        for kind, style, filled in (("ptq", "--", False), ("qat", "-", True)):
            pts = sorted((p for p in points if (p["boundary"], p["channels"]) == g and kind in p),
                         key=lambda p: p["bits"])
            if not pts:
                continue
            ax.plot([p[kind]["bytes_mean"] for p in pts], [p[kind]["accuracy"] for p in pts], style, color=c,
                    lw=1.2 if filled else 1.0, alpha=0.8, zorder=2)
            for p in pts:
                ax.plot([p[kind]["bytes_mean"]], [p[kind]["accuracy"]], ls="none", marker=bit_marker[p["bits"]],
                        ms=6, mec=c, mew=1.3, mfc=c if filled else "white", zorder=3)
        handles.append(Line2D([], [], color=c, lw=2.5, label=f"boundary {g[0]}, {g[1]} ch"))
    # references at the same place (boundaries of one shape) share one marker and one legend entry
    ref_marks: dict[tuple[str, str, float, float], list[int]] = {}
    for r in refs:
        for name, marker, x, y in ((r["codec"], "X", r["bytes_mean"], r["accuracy"]),
                                   ("float32", "*", r["fp32_bytes"], r["reference_accuracy"])):
            ref_marks.setdefault((name, marker, round(float(x), 1), round(float(y), 4)), []).append(r["boundary"])
    for (name, marker, x, y), bs in ref_marks.items():
        c = shade(bs[0], 1, 1) if len(set(bs)) == 1 else "white"
        style = {"ls": "none", "marker": marker, "ms": 8 if marker == "X" else 11, "color": c, "mec": "black",
                 "mew": 0.5}
        ax.plot([x], [y], zorder=3, **style)
        where = f"boundary {bs[0]}" if len(bs) == 1 else "boundaries " + ", ".join(str(b) for b in bs)
        handles.append(Line2D([], [], label=f"{name}, {where}", **style))
    kinds = {k for p in points for k in ("ptq", "qat") if k in p}
    if "qat" in kinds:
        handles.append(Line2D([], [], color="0.3", ls="-", marker="o", mfc="0.3", mec="0.3",
                              label="QAT: solid, filled"))
    if "ptq" in kinds:
        handles.append(Line2D([], [], color="0.3", ls="--", marker="o", mfc="white", mec="0.3",
                              label="PTQ only: dashed, hollow"))
    if groups:
        for q, m in bit_marker.items():
            handles.append(Line2D([], [], ls="none", marker=m, mfc="white", mec="0.3", label=f"{q} bit"))
    ax.set_xscale("log")
    ax.margins(x=0.06, y=0.06)
    ax.set_xlabel("bytes per offloaded sample (log scale)")
    ax.set_ylabel("top-1 accuracy (test)")
    ax.set_title(f"rate vs accuracy of feature codecs ({sweep.get('model', 'default')} model)")
    ax.grid(True, which="major", alpha=0.3)
    if handles:  # right of the axes, as many columns of at most 20 entries as needed; the figure widens for them
        ncol = -(-len(handles) // 20)
        fig.set_size_inches(7.5 + 2.0 * ncol, 5.0)
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                  ncol=ncol, handlelength=2.5, frameon=False)
    return fig


def rate_accuracy_plot(sweep: dict, path: Path) -> Path:
    """Write :func:`rate_accuracy_figure` of ``sweep`` (a ``plan codec-sweep`` result) to ``path``."""
    return _write(rate_accuracy_figure(sweep), path)


def bytes_per_boundary_figure(plan: Plan) -> Figure:
    """float32 bytes and the planned payload bytes at every boundary (log scale)."""
    fig = _figure((7, 4))
    ax = fig.add_subplot()
    idx = [b.index for b in plan.boundaries]
    ax.semilogy(idx, [b.fp32_bytes for b in plan.boundaries], "o-", label="float32")
    by_codec: dict[str, list[tuple[int, int]]] = {}
    for e in plan.estimates:
        if e.bytes_per_offload:
            by_codec.setdefault(e.codec, []).append((e.split, e.bytes_per_offload))
    for name, pts in sorted(by_codec.items()):
        pts.sort()
        ax.semilogy([p[0] for p in pts], [p[1] for p in pts], "s" if len(pts) == 1 else "x-", label=name)
    _integer_ticks(ax.xaxis)
    n = plan.boundaries[-1].index
    return _finish(fig, ax, f"boundary (0 = input, {n} = output)", "bytes per sample",
                   f"bytes per boundary ({plan.model.name})")


def bytes_per_boundary_plot(plan: Plan, path: Path) -> Path:
    """Write :func:`bytes_per_boundary_figure` to ``path``."""
    return _write(bytes_per_boundary_figure(plan), path)


def latency_vs_split_figure(plan: Plan) -> Figure:
    """Expected end-to-end latency of every split at several bandwidths (the plan's ``latency_curves``)."""
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for c in plan.latency_curves:
        ax.plot(c.splits, c.latency_ms, "o-", markersize=3, label=f"{c.bandwidth_bps / 1e6:g} Mbit/s")
        k = min(range(len(c.splits)), key=lambda i: c.latency_ms[i])
        ax.scatter([c.splits[k]], [c.latency_ms[k]], marker="*", s=120, color="k", zorder=3)
    n = plan.boundaries[-1].index
    ax.axvline(0, color="gray", lw=0.8, ls=":")
    ax.axvline(n, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    _integer_ticks(ax.xaxis)
    rtt = plan.latency_curves[0].rtt_ms if plan.latency_curves else 0
    return _finish(fig, ax, f"split (0 = cloud-only, {n} = edge-only)", "expected end-to-end latency (ms, log scale)",
                   f"latency vs split, {plan.model.name}, RTT {rtt:g} ms (* = best per bandwidth)")


def latency_vs_split_plot(plan: Plan, path: Path) -> Path:
    """Write :func:`latency_vs_split_figure` to ``path``."""
    return _write(latency_vs_split_figure(plan), path)


def operating_point_figure(plan: Plan) -> Figure:
    """The chosen split over the bandwidth x RTT grid (color), annotated with split, codec and latency."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    bws = sorted({p.bandwidth_bps for p in plan.operating_points})
    rtts = sorted({p.rtt_ms for p in plan.operating_points})
    grid = np.full((len(rtts), len(bws)), np.nan)
    fig = _figure((0.95 * len(bws) + 2.5, 0.75 * len(rtts) + 2))
    ax = fig.add_subplot()
    n = plan.boundaries[-1].index
    for p in plan.operating_points:
        i, j = rtts.index(p.rtt_ms), bws.index(p.bandwidth_bps)
        grid[i, j] = p.split
        tag = "B" if p.codec == "bottleneck" else ""
        ax.text(j, i, f"{p.split}{tag}\n{p.expected_latency_ms:.3g} ms", ha="center", va="center", fontsize=7,
                color="white" if p.split < 0.5 * n else "black")  # readable on viridis' dark and light ends
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=n)
    fig.colorbar(im, ax=ax, label=f"split (0 = cloud-only, {n} = edge-only)",
                 ticks=MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xticks(range(len(bws)), [f"{b / 1e6:g}" for b in bws])
    ax.set_yticks(range(len(rtts)), [f"{r:g}" for r in rtts])
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel("round-trip time (ms)")
    ax.set_title(f"operating points, {plan.model.name} (B = learned bottleneck codec)", fontsize=9)
    fig.tight_layout()
    return fig


def operating_point_map(plan: Plan, path: Path) -> Path:
    """Write :func:`operating_point_figure` to ``path``."""
    return _write(operating_point_figure(plan), path)


def compression_figure(variants: list[dict]) -> Figure:
    """Accuracy vs stored bytes and accuracy vs latency of compressed variants. Each variant: ``name``,
    ``test_accuracy``, ``stored_bytes`` and optionally ``latency_ms`` (None: not measured)."""
    fig = _figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors  # one colour per variant: the default cycle repeats after 10
    for i, v in enumerate(variants):
        marker = "*" if v["name"] == "fp32" else "o"
        style = {"marker": marker, "s": 60, "label": v["name"], "color": colors[(2 * i) % 20 + (2 * i) // 20 % 2]}
        left.scatter(v["stored_bytes"] / 1e3, 100 * v["test_accuracy"], **style)
        if v.get("latency_ms") is not None:
            right.scatter(v["latency_ms"], 100 * v["test_accuracy"], **style)
    left.set_xscale("log")
    _finish(fig, left, "stored weights (kB, log)", "test accuracy (%)", "accuracy vs stored bytes")
    _finish(fig, right, "full model latency, batch 1, 1 thread (ms)", "test accuracy (%)",
            "accuracy vs latency (sub-8-bit: fp32 kernels)")
    return fig


def compression_plot(variants: list[dict], path: Path) -> Path:
    """Write :func:`compression_figure` to ``path``."""
    return _write(compression_figure(variants), path)


def leakage_points_of_plan(plan: Plan) -> list[tuple[int, str, float, float]]:
    """(split, codec, SSIM, payload bytes) of every estimate of ``plan`` that carries a leakage figure."""
    return [(e.split, e.codec, e.leakage_ssim, float(e.bytes_per_offload)) for e in plan.estimates
            if e.leakage_ssim is not None and e.bytes_per_offload > 0]


def leakage_figure(points: list[tuple[int, str, float, float]], title: str) -> Figure:
    """Leakage (white-box SSIM) vs split and vs payload bytes, one series per codec."""
    fig = _figure((10, 4.2), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    by_codec: dict[str, list[tuple[int, float, float]]] = {}
    for split, codec, ssim, nbytes in points:
        by_codec.setdefault(codec, []).append((split, ssim, nbytes))
    for name, pts in sorted(by_codec.items()):
        pts.sort()
        style = "s" if len(pts) == 1 else "o-"
        left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        right.semilogx([p[2] for p in pts], [p[1] for p in pts], "s" if len(pts) == 1 else "o", label=name)
    for ax in (left, right):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("SSIM of the white-box reconstruction")
    _integer_ticks(left.xaxis)
    left.set_xlabel("split (0 = the input itself)")
    right.set_xlabel("payload bytes per offloaded request (log)")
    left.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def leakage_plot(points: list[tuple[int, str, float, float]], title: str, path: Path) -> Path:
    """Write :func:`leakage_figure` to ``path``."""
    return _write(leakage_figure(points, title), path)
