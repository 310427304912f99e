"""`splitinfer edge classify FILES...` and the watched-directory source: one JSON line per file, bad files
reported without stopping the others."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.metrics import EdgeMetrics
from edge_agent.runtime import EdgeRuntime
from edge_agent.settings import EdgeSettings
from edge_agent.sources import new_files, watch
from splitinfer.bundle import load_bundle
from tests.support.fakes import FakeClient


def _png(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
    return path


def test_classify_writes_one_line_per_file_and_fails_on_bad_ones(bundle_dir, tmp_path, free_port, caplog):
    good = _png(tmp_path / "a.png")
    arr = tmp_path / "b.npy"
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 28, 28), dtype=np.float32))
    arr.write_bytes(buf.getvalue())
    junk = tmp_path / "c.png"
    junk.write_bytes(b"not an image at all")
    missing = tmp_path / "d.png"
    dead = f"127.0.0.1:{free_port()}"
    refused = CliRunner().invoke(app, ["classify", str(good), "--bundle", str(bundle_dir), "--server", dead])
    assert refused.exit_code == 1 and not refused.stdout.strip(), refused.output  # no answers without a server
    assert "cloud server not reachable" in refused.stderr and "connection refused" in refused.stderr
    assert "--allow-degraded" in refused.stderr
    assert not [r for r in caplog.records if "retry in" in r.getMessage()]  # a one-shot command retries nothing
    res = CliRunner().invoke(app, ["classify", str(good), str(arr), str(junk), str(missing), "--bundle",
                                   str(bundle_dir), "--server", dead, "--allow-degraded"])
    assert res.exit_code == 1, res.output
    assert "answering on the device" in res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [rec["file"] for rec in lines] == [str(good), str(arr), str(junk), str(missing)]
    assert "label" in lines[0] and "label" in lines[1]
    assert lines[0]["degraded"] or lines[0]["outcome"] == "edge_exit"  # no server: answered on the device
    assert "error" in lines[2] and "error" in lines[3] and "label" not in lines[2]


def test_watched_directory_classifies_each_settled_file_once(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    rt = EdgeRuntime(bundle, FakeClient(bundle), EdgeSettings(bundle=bundle_dir, server="127.0.0.1:1",
                                                              adaptive=False), metrics=EdgeMetrics())
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old = [_png(inbox / f"{i}.png", i) for i in range(3)]
    for p in old:
        os.utime(p, (time.time() - 10, time.time() - 10))
    (inbox / "notes.txt").write_text("ignored")
    fresh = _png(inbox / "fresh.png", 9)  # just written: not settled yet
    assert new_files(inbox, set(), settle_s=5.0) == old
    out = io.StringIO()
    polls = 0

    def stop() -> bool:
        return polls >= 2

    try:
        for _total in watch(rt, inbox, out, 1 << 20, 1 << 22, interval_s=0.0, settle_s=5.0, stop=stop):
            polls += 1
            os.utime(fresh, (time.time() - 10, time.time() - 10))  # settles before the second poll
    finally:
        rt.close()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(r["file"] for r in records) == sorted(str(p) for p in [*old, fresh])  # each once
    assert all("label" in r for r in records)
