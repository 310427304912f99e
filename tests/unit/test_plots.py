"""The report's figures, measured on the rendered canvas: integer ticks on integer axes, and rate-accuracy text that
neither overlaps nor leaves the figure, with every point inside the axes."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from partitioner.plots import (
    bytes_per_boundary_figure,
    latency_vs_split_figure,
    operating_point_figure,
    rate_accuracy_figure,
    rate_accuracy_plot,
)
from splitinfer.bundle import (
    BoundarySpec,
    CodecSpec,
    InputSpec,
    LatencyCurve,
    ModelSpec,
    OperatingPoint,
    Plan,
    SplitEstimate,
    StageSpec,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOL = 0.5  # pixels


# ---------------------------------------------------------------------------------------------- inputs


def _ev(nbytes: float, acc: float, ref: float = 0.9285) -> dict:
    return {"bytes_mean": round(nbytes, 2), "accuracy": round(acc, 4), "agreement": round(acc + 0.03, 4),
            "reference_accuracy": ref, "drop_points": round(100 * (ref - acc), 2)}


def dense_sweep(boundaries=((6, 37632, 196), (8, 37632, 196), (11, 18816, 49)), channels=(2, 4, 8, 16),
                bits=(2, 3, 4), qat: bool = True, seed: int = 7) -> dict:
    """A sweep shaped like ``run_sweep``'s result with many points close together (36 by default, 72 markers),
    and references of boundaries with the same shape at the same place."""
    rng = random.Random(seed)
    points, refs = [], []
    for b, fp32, positions in boundaries:
        refs.append({"boundary": b, "codec": "uint8-affine", "fp32_bytes": fp32,
                     **_ev(fp32 / 4 + 384, 0.9286)})
        for c, q in itertools.product(channels, bits):
            raw = c * positions * q / 8
            drop = 10 / c**0.8 / (q - 1) ** 1.2 + rng.uniform(0, 0.4)
            e = {"boundary": b, "channels": c, "bits": q, "fp32_bytes": fp32,
                 "ptq": _ev(raw * (0.45 + 0.05 * q + rng.uniform(-0.03, 0.03)), 0.9285 - 1.8 * drop / 100)}
            if qat:
                e["qat"] = _ev(raw * (0.5 + 0.05 * q + rng.uniform(-0.03, 0.03)), 0.9285 - drop / 100)
            points.append(e)
    return {"model": "default", "references": refs, "points": points}


COMMITTED_LIKE = {  # docs/results/codec_sweep.json's figures (boundary 6, 4 and 8 channels, 2-4 bits)
    "model": "default",
    "references": [{"boundary": 6, "codec": "uint8-affine", "fp32_bytes": 37632, **_ev(9792.0, 0.9286)}],
    "points": [{"boundary": 6, "channels": c, "bits": q, "fp32_bytes": 37632, "ptq": _ev(pb, pa), "qat": _ev(qb, qa)}
               for c, q, pb, pa, qb, qa in ((4, 2, 45.32, 0.8414, 54.95, 0.9015), (4, 3, 68.68, 0.8965, 76.83, 0.9067),
                                            (4, 4, 93.1, 0.899, 97.58, 0.9079), (8, 2, 71.1, 0.8639, 94.3, 0.9071),
                                            (8, 3, 120.55, 0.899, 133.3, 0.9121),
                                            (8, 4, 170.42, 0.9011, 177.25, 0.913))],
}

SWEEPS = {
    "dense": dense_sweep(),
    "committed-like": COMMITTED_LIKE,
    "ptq-only-no-references": {**dense_sweep(boundaries=((6, 37632, 196),), qat=False), "references": []},
    "very-dense": dense_sweep(boundaries=((3, 100352, 784), (6, 37632, 196), (8, 37632, 196), (9, 18816, 49),
                                          (11, 18816, 49), (13, 18816, 49)), channels=(2, 4, 8, 16, 32)),
}


def make_plan(n: int) -> Plan:
    """A plan of ``n`` stages (boundaries 0..n) with estimates, latency curves and an operating-point grid."""
    shapes = [[max(1, 64 >> (i // 3)), 7, 7] for i in range(n)] + [[10]]
    boundaries = [BoundarySpec(index=i, node=f"n{i}", shape=s, fp32_bytes=4 * math.prod(s))
                  for i, s in enumerate(shapes)]
    estimates = [SplitEstimate(split=k, codec="uint8-affine", expected_latency_ms=10.0 + k, edge_ms=k, transfer_ms=1,
                               server_ms=1, bytes_per_offload=boundaries[k].fp32_bytes // 4 if k < n else 0,
                               offload_rate=1.0 if k < n else 0.0, exits=[]) for k in range(n + 1)]
    bws = (0.5e6, 2e6, 10e6, 50e6, 200e6)
    curves = [LatencyCurve(bandwidth_bps=bw, rtt_ms=20, splits=list(range(n + 1)),
                           latency_ms=[5 + 2 * k + boundaries[k].fp32_bytes * 8e3 / bw / 4 for k in range(n + 1)])
              for bw in bws]
    grid = [OperatingPoint(bandwidth_bps=bw, rtt_ms=rtt, split=(i * n) // (len(bws) - 1), codec="uint8-affine",
                           exits=[], expected_latency_ms=3.0 + i + rtt, expected_bytes=100.0)
            for i, bw in enumerate(bws) for rtt in (5, 20, 100)]
    return Plan(created="2026-01-01T00:00:00+00:00", model=ModelSpec(name=f"toy{n}", num_classes=10, params=1),
                input=InputSpec(shape=[1, 7, 7], mean=[0.0], std=[1.0], labels=[f"c{i}" for i in range(10)]),
                boundaries=boundaries, stages=[StageSpec(index=i, macs=1, params=1) for i in range(n)],
                split=n, codec=CodecSpec(name="uint8-affine"), estimates=estimates, latency_curves=curves,
                operating_points=grid)


# ---------------------------------------------------------------------------------------------- helpers


def _render(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _in_view(axis, locs):
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(1.0, abs(lo), abs(hi))
    return [t for t in locs if lo - eps <= t <= hi + eps]


def _tick_labels(axis):
    """The tick labels actually drawn: visible, non-empty, at a tick inside the view."""
    out = []
    for ticks, locs in ((axis.get_major_ticks(), axis.get_majorticklocs()),
                        (axis.get_minor_ticks(), axis.get_minorticklocs())):
        kept = set(_in_view(axis, locs))
        out += [t.label1 for t, loc in zip(ticks, locs, strict=False)
                if loc in kept and t.label1.get_visible() and t.label1.get_text().strip()]
    return out


def _assert_integer_ticks(axis, what: str):
    ticks = _in_view(axis, axis.get_majorticklocs())
    assert ticks, f"{what}: no tick inside the view"
    assert all(abs(t - round(t)) < 1e-9 for t in ticks), f"{what}: fractional ticks {list(ticks)}"


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - TOL and b.x0 < a.x1 - TOL and a.y0 < b.y1 - TOL and b.y0 < a.y1 - TOL


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 - TOL and inner.y0 >= outer.y0 - TOL and inner.x1 <= outer.x1 + TOL
            and inner.y1 <= outer.y1 + TOL)


# ---------------------------------------------------------------------------------------------- rate vs accuracy


@pytest.mark.parametrize("name", list(SWEEPS))
def test_rate_accuracy_text_does_not_overlap_and_stays_in_the_figure(name):
    fig = rate_accuracy_figure(SWEEPS[name])
    renderer = _render(fig)
    ax = fig.axes[0]
    legend = ax.get_legend()
    labels = [t for t in [*legend.get_texts(), *ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label]
              if t.get_visible() and t.get_text().strip()]
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in labels}
    assert len(boxes) == len(labels), "two labels say the same thing"
    for text, box in boxes.items():
        assert _inside(box, fig.bbox), f"{text!r} at {box} leaves the figure {fig.bbox}"
    for (ta, a), (tb, b) in itertools.combinations(boxes.items(), 2):
        assert not _overlap(a, b), f"{ta!r} overlaps {tb!r}"
    for axis in (ax.xaxis, ax.yaxis):
        ticks = [t.get_window_extent(renderer) for t in _tick_labels(axis)]
        assert all(_inside(b, fig.bbox) for b in ticks)
        assert not any(_overlap(a, b) for a, b in itertools.combinations(ticks, 2))
    # the legend hides no data: it lies beside the axes, and inside the figure
    assert not _overlap(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
    assert _inside(legend.get_window_extent(renderer), fig.bbox)


@pytest.mark.parametrize("name", list(SWEEPS))
def test_rate_accuracy_draws_every_point_inside_the_axes_and_explains_it(name):
    sweep = SWEEPS[name]
    fig = rate_accuracy_figure(sweep)
    renderer = _render(fig)
    ax = fig.axes[0]
    markers = [line for line in ax.lines if line.get_marker() not in (None, "None", "")]
    drawn = {(round(float(x), 2), round(float(y), 4)) for line in markers
             for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)}
    want = {(round(p[k]["bytes_mean"], 2), round(p[k]["accuracy"], 4)) for p in sweep["points"] for k in ("ptq", "qat")
            if k in p}
    want |= {(round(r["bytes_mean"], 2), round(r["accuracy"], 4)) for r in sweep["references"]}
    want |= {(round(r["fp32_bytes"], 2), round(r["reference_accuracy"], 4)) for r in sweep["references"]}
    assert want <= drawn
    box = ax.get_window_extent(renderer)
    for line in ax.lines:  # every marker wholly inside the axes (not clipped at an edge)
        r = line.get_markersize() * fig.dpi / 72 / 2
        for px, py in ax.transData.transform(list(zip(line.get_xdata(), line.get_ydata(), strict=True))):
            assert box.x0 + r <= px + TOL and px - TOL <= box.x1 - r, (line.get_label(), px, box)
            assert box.y0 + r <= py + TOL and py - TOL <= box.y1 - r, (line.get_label(), py, box)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    groups = {(p["boundary"], p["channels"]) for p in sweep["points"]}
    assert {f"boundary {b}, {c} ch" for b, c in groups} <= set(texts)
    assert {f"{q} bit" for q in {p["bits"] for p in sweep["points"]}} <= set(texts)
    for r in sweep["references"]:
        assert any(t.startswith(f"{r['codec']}, boundar") and str(r["boundary"]) in t for t in texts)
    assert not ax.texts  # no per-point annotations to collide


def test_rate_accuracy_plot_keeps_its_signature_and_writes_a_png(tmp_path):
    out = rate_accuracy_plot(SWEEPS["dense"], tmp_path / "rate_accuracy.png")
    assert out == tmp_path / "rate_accuracy.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------- integer axes


@pytest.mark.parametrize("n", [1, 2, 5, 17, 60])
def test_boundary_and_split_axes_have_integer_ticks(n):
    plan = make_plan(n)
    for make in (bytes_per_boundary_figure, latency_vs_split_figure):
        fig = make(plan)
        _render(fig)
        _assert_integer_ticks(fig.axes[0].xaxis, f"{make.__name__}, {n} stages")
    fig = operating_point_figure(plan)
    _render(fig)
    ax = fig.axes[0]
    cbar = ax.images[0].colorbar
    _assert_integer_ticks(cbar.ax.yaxis, f"operating-point colour bar, {n} stages")
    # the grid's own ticks are its bandwidths and RTTs, one per cell
    assert len(_in_view(ax.xaxis, ax.get_xticks())) == 5 and len(_in_view(ax.yaxis, ax.get_yticks())) == 3
