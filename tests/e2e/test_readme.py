"""The README's "Using the pieces" command blocks, run as a newcomer would type them.

Each ```bash block under "Using the pieces" becomes one bash script, run in order in one temporary directory
(later blocks use what earlier ones wrote). What the test changes, and nothing more:

* ports: 8001, 8002, 8003 and 8080 become free loopback ports (the same one everywhere in a block);
* ``. .venv/bin/activate`` points at this checkout's venv (the scripts run outside the checkout);
* after a line that starts a daemon in the background (``... &``) it waits until the daemon answers, as a user
  waits before the next command (gRPC health for ``cloud serve``, ``/readyz`` for ``edge run``);
* the commands in :data:`QUICK` get extra options so they take seconds, not the 10-15 minutes the README
  states (fewer images and epochs; re-training writes into the temporary directory, never the committed
  weights): the same code runs;
* files a user brings are made first: ``photos/`` (JPEG photos) and the TLS certificates and keys.

A README command block the test does not know how to run fails the test, so README and test cannot drift.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from partitioner.cost import parse_bandwidth, parse_duration
from splitinfer.daemons import free_port
from splitinfer.data import fashion_mnist_dir

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PORTS = ("8001", "8002", "8003", "8080")
# Test-only options appended to slow commands (see the module docstring).
QUICK = {
    "splitinfer plan train-default": "--epochs 1 --exit-epochs 1 --train-limit 512 --test-limit 256 "
                                     "--out-dir weights-tmp --no-progress",
    "splitinfer plan train-embedded": "--epochs 1 --exit-epochs 1 --train-limit 512 --test-limit 256 "
                                      "--out-dir weights-tmp --no-progress",
    "splitinfer plan train-bottleneck": "--epochs-float 1 --epochs-qat 1 --train-limit 512 --test-limit 256 "
                                        "--out-dir weights-tmp --no-progress",
    "splitinfer plan codec-sweep": "--train-limit 256 --test-limit 256",
    "splitinfer plan compress": "--epochs 0.05 --train-limit 512 --val-images 200",
    "splitinfer plan privacy": "--train-images 300 --test-images 100 --epochs 1 --boundaries 6",
}
# Every block the README has under "Using the pieces", by its heading: the test must know each one.
BLOCKS = (
    "Plan a split, serve it, send it images",
    "Plan a split, serve it, send it images (latency only)",
    "Other models, measured profiles, users' photos",
    "Compressed models",
    "What the payload reveals",
    "Exits, exports, folders of files",
    "Production: repository, TLS, tokens, replicas",
    "Re-training the committed models",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400),  # seven blocks (about 5 minutes here); pyproject's 600 s is per test
    pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


def readme_blocks() -> list[tuple[str, str]]:
    """(heading, text) of each bash block under "## Using the pieces"; a second block under the same heading
    gets the parenthesised name of :data:`BLOCKS`."""
    text = README.read_text()
    section = text.split("## Using the pieces", 1)[1].split("\n## ", 1)[0]
    blocks: list[tuple[str, str]] = []
    heading = ""
    for part in re.split(r"(^### .*$)", section, flags=re.M):
        if part.startswith("### "):
            heading = part[4:].strip()
            continue
        for i, code in enumerate(re.findall(r"```bash\n(.*?)```", part, flags=re.S)):
            blocks.append((heading if i == 0 else f"{heading} (latency only)", code))
    return blocks


def _commands(code: str) -> list[str]:
    """Join backslash continuations: one string per command line."""
    lines, current = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current)
        current = ""
    return lines


def _split_comment(line: str) -> tuple[str, str]:
    m = re.search(r"\s+#\s", line)
    return (line[: m.start()], line[m.start():]) if m else (line, "")


def to_script(code: str, ports: dict[str, int]) -> str:
    """The bash script that runs one README block (see the module docstring for every change)."""
    out = ["set -eo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for line in _commands(code):
        line = re.sub(r"\b(" + "|".join(PORTS) + r")\b", lambda m: str(ports[m.group(1)]), line)
        line = line.replace(". .venv/bin/activate", f". {REPO}/.venv/bin/activate")
        command, comment = _split_comment(line)
        for prefix, extra in QUICK.items():
            if command.strip().startswith(prefix):
                command = f"{command.rstrip()} {extra}"
        out.append(command + comment)
        if command.rstrip().endswith("&"):
            if "cloud serve" in command:
                port = re.search(r"--port (\d+)", command).group(1)
                tls = " ca.crt edge.crt edge.key" if "--tls-client-ca" in command else ""
                out.append(f"python -m tests.e2e.wait_ready grpc 127.0.0.1:{port} $!{tls}")
            elif "edge run" in command:
                port = re.search(r"--port (\d+)", command).group(1)
                out.append(f"python -m tests.e2e.wait_ready http http://127.0.0.1:{port}/readyz $!")
            else:
                raise AssertionError(f"README starts a background command the test cannot wait for: {line}")
    return "\n".join(out) + "\n"


def _user_files(work: Path) -> None:
    """What a user brings: a folder of photos and the fleet's TLS certificates."""
    from PIL import Image

    from tests.certs import make_certificates

    photos = work / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        base = rng.integers(0, 255, (1, 1, 3)) * np.ones((48, 64, 3))
        img = np.clip(base + rng.normal(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).resize((640, 480)).save(photos / f"photo{i}.jpg", quality=85)
    certs = work / "certs"
    certs.mkdir()
    made = make_certificates(certs)
    for name, target in (("ca", "ca"), ("server", "s"), ("client", "edge")):
        shutil.copy(made[name], work / f"{target}.crt")
        shutil.copy(certs / f"{name}.key", work / f"{target}.key")


def _run(script: str, work: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    (work / f"{name}.sh").write_text(script)
    proc = subprocess.run(["bash", f"{name}.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (f"README block {name!r} failed ({proc.returncode}):\n{script}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and line.endswith("}")]


def test_readme_blocks_run_as_written(tmp_path):
    blocks = readme_blocks()
    assert [h for h, _ in blocks] == list(BLOCKS), "README blocks changed: teach this test the new ones"
    _user_files(tmp_path)
    outputs, ports_of = {}, {}
    for heading, code in blocks:
        ports = ports_of[heading] = {p: free_port() for p in PORTS}
        outputs[heading] = _run(to_script(code, ports), tmp_path, re.sub(r"\W+", "_", heading).strip("_")).stdout

    # The offloading example: the plan splits in the middle, and the agent offloads (no degraded answers).
    first = outputs[BLOCKS[0]]
    split = int(re.search(r"^chosen: split (\d+),", first, flags=re.M).group(1))
    plan = json.loads((tmp_path / "runs" / "bundle" / "plan.json").read_text())
    assert 0 < split < len(plan["stages"]) and plan["split"] == split
    answers = [a for a in _json_lines(first) if "decided_by" in a]
    assert len(answers) == 21  # curl + 20 files classified
    assert not [a for a in answers if a["degraded"]], answers
    offloaded = [a for a in answers if a["decided_by"] == "cloud"]
    assert offloaded and all(a["bytes_sent"] > 0 and a["latency_ms"]["tail"] > 0 for a in offloaded)
    served = re.search(r'^splitinfer_server_requests_total\{code="OK",model="default"\} (\S+)', first, flags=re.M)
    assert served and float(served.group(1)) >= len(offloaded)
    flags = re.search(r"plan make --bandwidth (\S+) --rtt (\S+) --overhead \d+", first)  # what `plan probe` says
    assert flags, first
    parse_bandwidth(flags.group(1)), parse_duration(flags.group(2))  # plan make reads what the probe prints
    for png in ("latency_vs_split.png", "operating_points.png", "bytes_per_boundary.png"):
        assert (tmp_path / "runs" / "bundle" / png).is_file()

    # Latency alone, every split allowed: a valid plan (the README explains why it may be edge-only).
    assert re.search(r"^chosen: split \d+,", outputs[BLOCKS[1]], flags=re.M)
    assert json.loads((tmp_path / "runs" / "latency-only" / "plan.json").read_text())["split"] >= 0

    # resnet50: real profiles, random weights said, the photos make the image codec a candidate.
    r50 = json.loads((tmp_path / "runs" / "r50-photos" / "plan.json").read_text())
    assert r50["model"]["weights_source"] == "random" and r50["input"]["labels"][0] == "tench"
    assert "image" in {e["codec"] for e in r50["estimates"]}
    assert "accuracy not measured (random weights)" in outputs[BLOCKS[2]]

    # Compressed models: written, planned into a bundle that loads, drawn by plan report.
    comp = outputs[BLOCKS[3]]
    assert re.search(r"^deep: test accuracy .* stored [\d,]+ B \((\d+\.\d)x below fp32", comp, flags=re.M), comp
    assert (tmp_path / "runs" / "bundle-deep" / "plan.json").is_file()
    assert json.loads((tmp_path / "runs" / "bundle-deep" / "plan.json").read_text())["model"]["compression"]["method"] \
        == "deep"
    assert (tmp_path / "runs" / "compression.png").is_file() and "auto (auto)" in comp
    joint = json.loads((tmp_path / "runs" / "bundle-joint" / "plan.json").read_text())
    assert joint["notes"]["head_variant"] != "fp32"  # fp32's bundle (~1.5 MB) does not fit in 900,000 bytes
    assert joint["exit_calibration"]["epsilon"] <= 0.05 and "end to end" in joint["notes"]["certificate"]
    assert sum(f.stat().st_size for f in (tmp_path / "runs" / "bundle-joint").iterdir()) <= 900_000

    # What the payload reveals: a leakage table measured, a plan within the bound, leakage drawn.
    leak = json.loads((tmp_path / "runs" / "leakage.json").read_text())
    assert leak["format"] == "splitinfer-leakage" and (tmp_path / "runs" / "leakage.png").is_file()
    private = json.loads((tmp_path / "runs" / "bundle-private" / "plan.json").read_text())
    picked = (private["split"], private["codec"]["name"])
    chosen = [e for e in private["estimates"] if (e["split"], e["codec"]) == picked]
    assert chosen and chosen[0]["leakage_ssim"] <= 0.6
    assert (tmp_path / "runs" / "bundle-private" / "leakage.png").is_file()

    # Exits recalibrated, the Triton export written, the watched folder classified once per file.
    assert any((tmp_path / "triton-repo").glob("*/config.pbtxt"))
    watched = _json_lines((tmp_path / "results.jsonl").read_text())
    assert len(watched) == len(list((tmp_path / "inbox").iterdir())) and all("label" in r for r in watched)

    # Production: over mutual TLS with a token, through the replica that is up.
    prod = _json_lines(outputs[BLOCKS[6]])
    assert len(prod) == 20 and not [a for a in prod if a["degraded"]]
    assert [a for a in prod if a["decided_by"] == "cloud"]
    up = ports_of[BLOCKS[6]]["8001"]
    assert re.search(rf'"address": "127.0.0.1:{up}",\s+"inflight": \d+,\s+"calls": [1-9]\d*,\s+"failures": 0,\s+'
                     r'"state": "closed"', outputs[BLOCKS[6]]), outputs[BLOCKS[6]]

    # Re-training and the sweep wrote into the temporary folders, not the committed weights.
    assert (tmp_path / "weights-tmp" / "default.safetensors").is_file()
    assert (tmp_path / "runs" / "sweep" / "rate_accuracy.png").is_file()
