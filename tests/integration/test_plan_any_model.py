"""`plan make` on a torchvision model: profiles from files, objectives and constraints, the bundle it writes,
and a real server answering at the splits of its operating points."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from partitioner.cli import app
from partitioner.make import GRID_BANDWIDTHS, GRID_RTTS
from splitinfer.bundle import load_bundle
from tests.support.servers import free_port, start_server

pytestmark = pytest.mark.slow  # plans and serves torchvision models (about 17 s)

pytest.importorskip("torchvision")
SHAPE = "3,64,64"


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    runner = CliRunner()
    for name, extra in (("edge", []), ("server", ["--batch-sizes", "1,4"])):
        res = runner.invoke(app, ["profile", "--model", "resnet18", "--input-shape", SHAPE, "--repeats", "3",
                                  "--out", str(d / f"{name}.json"), "--no-progress", *extra])
        assert res.exit_code == 0, res.output
    return d


def _make(out, profiles, *extra):
    return CliRunner().invoke(app, ["make", "--model", "resnet18", "--input-shape", SHAPE, "--out", str(out),
                                    "--edge-profile", str(profiles / "edge.json"),
                                    "--server-profile", str(profiles / "server.json"), "--json", "--no-progress",
                                    *extra])


def test_plan_from_profile_files_writes_a_loadable_bundle(tmp_path, profiles):
    res = _make(tmp_path / "b", profiles, "--bandwidth", "1mbit", "--rtt", "50ms", "--edge-slowdown", "8")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    bundle = load_bundle(tmp_path / "b")
    plan = bundle.plan
    n = bundle.staged.num_stages
    assert plan.split == out["split"] and plan.model.name == "resnet18" and plan.input.shape == [3, 64, 64]
    assert {p.split for p in plan.operating_points}
    assert len(plan.operating_points) == len(GRID_BANDWIDTHS) * len(GRID_RTTS)
    assert plan.pareto and plan.latency_curves and plan.objective["objective"] == "latency"
    assert plan.notes["edge_slowdown"] == 8
    # a slower edge makes offloading earlier worthwhile on a fast link, never later
    fast = [p for p in plan.operating_points if p.bandwidth_bps >= 100e6 and p.rtt_ms <= 5]
    assert all(p.split < n for p in fast)
    by_bw = sorted((p.bandwidth_bps, p.split) for p in plan.operating_points if p.rtt_ms == 150)
    assert by_bw[0][1] >= by_bw[-1][1]


def test_objectives_and_constraints(tmp_path, profiles):
    lat = json.loads(_make(tmp_path / "l", profiles, "--bandwidth", "200mbit", "--rtt", "5ms",
                           "--edge-slowdown", "8").stdout)
    few = json.loads(_make(tmp_path / "y", profiles, "--bandwidth", "200mbit", "--rtt", "5ms",
                           "--edge-slowdown", "8", "--objective", "bytes").stdout)
    assert few["chosen"]["expected_bytes"] <= lat["chosen"]["expected_bytes"]
    small = json.loads(_make(tmp_path / "m", profiles, "--bandwidth", "200mbit", "--rtt", "5ms",
                             "--edge-slowdown", "8", "--max-edge-memory", "2000000").stdout)
    assert small["chosen"]["edge_memory_bytes"] <= 2_000_000
    res = _make(tmp_path / "x", profiles, "--max-edge-memory", "1", "--max-bytes", "1")
    assert res.exit_code == 2 and "no configuration satisfies" in res.output
    res = _make(tmp_path / "w", profiles, "--objective", "weighted")
    assert res.exit_code != 0 and "positive weight" in res.output


def test_a_profile_of_another_model_is_refused(tmp_path, profiles):
    res = CliRunner().invoke(app, ["make", "--model", "resnet18", "--out", str(tmp_path / "b"),
                                   "--edge-profile", str(profiles / "edge.json"), "--no-progress"])
    assert res.exit_code == 2 and "another model" in res.output  # measured at 64x64, planned at 224x224


def test_server_answers_at_every_operating_point_split(tmp_path, profiles):
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings
    from edge_agent.transport import CloudClient

    res = _make(tmp_path / "b", profiles, "--bandwidth", "1mbit", "--rtt", "50ms", "--edge-slowdown", "8")
    assert res.exit_code == 0, res.output
    bundle = load_bundle(tmp_path / "b")
    server = start_server(tmp_path / "b", free_port(), free_port(), tmp_path / "server.log")
    try:
        address = f"127.0.0.1:{server.port}"
        rt = EdgeRuntime(bundle, CloudClient(address, "resnet18", timeout_s=30),
                         EdgeSettings(bundle=tmp_path / "b", server=address, timeout_s=30), metrics=EdgeMetrics())
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        n = bundle.staged.num_stages
        try:
            for split in sorted({p.split for p in bundle.plan.operating_points} | {0}):
                rt.set_operating_point(split)
                r = rt.infer(x, f"s{split}")
                assert not r.degraded and r.decided_by == ("cloud" if split < n else n)
                with torch.inference_mode():  # what the server must compute: the same codec, then the tail
                    h = bundle.staged.run(x, 0, split)
                    if split < n:
                        codec = bundle.codec_for(rt.codec_name, split)
                        h = bundle.staged.run(codec.decode(*codec.encode(h)), split, n)
                assert r.label == int(h.argmax())
        finally:
            rt.close()
    finally:
        server.stop()


def test_users_files_make_cloud_only_by_sending_the_file_an_operating_point(tmp_path, profiles):
    """With --input-images (JPEGs far smaller than the uint8 tensor) and a slow edge, the plan sends the file
    at split 0 (codec 'image'); the bundle loads and the edge runtime starts at that operating point."""
    import io

    import numpy as np
    from PIL import Image

    from edge_agent.metrics import EdgeMetrics
    from edge_agent.runtime import EdgeRuntime
    from edge_agent.settings import EdgeSettings

    photos = tmp_path / "photos"
    photos.mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(4):
        img = np.stack([(yy * 3 + i) % 256, (xx * 2) % 256, (yy + xx) % 256], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (photos / f"p{i}.jpg").write_bytes(buf.getvalue())
    res = _make(tmp_path / "b", profiles, "--bandwidth", "1mbit", "--rtt", "20ms", "--edge-slowdown", "20",
                "--input-images", str(photos))
    assert res.exit_code == 0, res.output
    plan = load_bundle(tmp_path / "b").plan
    assert (plan.split, plan.codec.name) == (0, "image")
    assert any(p.codec == "image" and p.split == 0 for p in plan.operating_points)
    bundle = load_bundle(tmp_path / "b")
    rt = EdgeRuntime(bundle, None, EdgeSettings(bundle=bundle.path, server="127.0.0.1:1", adaptive=False),
                     metrics=EdgeMetrics())
    assert (rt.split, rt.codec_name) == (0, "image")
    rt.close()
    bad = _make(tmp_path / "c", profiles, "--input-images", str(tmp_path / "nothing-here"))
    assert bad.exit_code != 0 and "not a folder" in bad.output
