"""The edge agent's systemd unit: `systemd-analyze verify` (syntax, directives, the executable) with no
warnings, and `systemd-analyze security` exposure within 'OK'."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "splitinfer-edge.service"
ENV = ROOT / "deploy" / "systemd" / "edge.env"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed here: the venv's splitinfer instead of /opt/splitinfer/venv, the repo's env file."""
    exe = Path(sys.executable).parent / "splitinfer"
    text = UNIT.read_text().replace("/opt/splitinfer/venv/bin/splitinfer", str(exe))
    text = text.replace("EnvironmentFile=/etc/splitinfer/edge.env", f"EnvironmentFile={ENV}")
    out = tmp_path / UNIT.name
    out.write_text(text)
    return out


def test_unit_verifies_without_warnings(tmp_path):
    unit = _installed_copy(tmp_path)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # parse problems are warnings with exit code 0


def test_a_broken_unit_is_caught(tmp_path):
    unit = _installed_copy(tmp_path)
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in res.stderr


def test_unit_is_hardened(tmp_path):
    text = UNIT.read_text()
    for directive in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure",
                      "EnvironmentFile=/etc/splitinfer/edge.env", "KillSignal=SIGTERM"):
        assert directive in text
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30",
                          str(_installed_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr  # exposure 3.0 or better ("OK")
    assert "Overall exposure level" in res.stdout


def test_env_file_holds_valid_settings(monkeypatch, tmp_path):
    from edge_agent.settings import EdgeSettings

    for line in ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.setenv("SPLITINFER_EDGE_BUNDLE", str(bundle))
    s = EdgeSettings.load()
    assert s.host == "127.0.0.1" and s.adaptive is True and s.server == "cloud.example.internal:8001"
