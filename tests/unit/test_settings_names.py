"""Both daemons spell shared settings alike; renamed settings still accept their old names, with a warning that
names the new one (splitinfer/settings_common.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cloud_server.settings import CloudSettings
from edge_agent.settings import EdgeSettings

SHARED = ("grace_s", "log_level", "max_inflight", "host", "port", "torch_threads", "tls_cert", "tls_key")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith(("SPLITINFER_CLOUD_", "SPLITINFER_EDGE_")):
            monkeypatch.delenv(key)


def edge(tmp_path, **kw) -> EdgeSettings:
    return EdgeSettings(bundle=tmp_path, server="127.0.0.1:1", **kw)


def test_shared_concepts_have_one_name_in_both_daemons():
    for name in SHARED:
        assert name in CloudSettings.model_fields and name in EdgeSettings.model_fields, name
    for old in (*CloudSettings.RENAMED, *EdgeSettings.RENAMED):
        assert old not in CloudSettings.model_fields and old not in EdgeSettings.model_fields, old


@pytest.mark.parametrize("level", ["DEBUG", "info", "Warning", "error", "CRITICAL"])
def test_both_daemons_take_the_same_log_levels_in_any_case(tmp_path, level):
    assert CloudSettings(bundle=tmp_path, log_level=level).log_level == level.lower()
    assert edge(tmp_path, log_level=level).log_level == level.lower()


@pytest.mark.parametrize(("old", "new", "value"), [("graceful_shutdown_s", "grace_s", 3.0),
                                                   ("max_pending", "max_inflight", 7)])
def test_old_edge_field_names_still_work_with_a_warning_naming_the_new_one(tmp_path, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new}"):
        s = edge(tmp_path, **{old: value})
    assert getattr(s, new) == value


def test_old_cloud_field_name_still_works(tmp_path):
    with pytest.warns(DeprecationWarning, match="max_batch is deprecated; use max_request_batch"):
        assert CloudSettings(bundle=tmp_path, max_batch=5).max_request_batch == 5


def test_old_environment_variables_still_work_and_the_new_ones_win(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITINFER_EDGE_GRACEFUL_SHUTDOWN_S", "4")
    monkeypatch.setenv("SPLITINFER_CLOUD_MAX_BATCH", "6")
    with pytest.warns(DeprecationWarning, match="SPLITINFER_EDGE_GRACEFUL_SHUTDOWN_S is deprecated; use "
                                                "SPLITINFER_EDGE_GRACE_S"):
        assert edge(tmp_path).grace_s == 4
    with pytest.warns(DeprecationWarning, match="use SPLITINFER_CLOUD_MAX_REQUEST_BATCH"):
        assert CloudSettings(bundle=tmp_path).max_request_batch == 6
    monkeypatch.setenv("SPLITINFER_EDGE_GRACE_S", "2")
    with pytest.warns(DeprecationWarning, match="ignored: SPLITINFER_EDGE_GRACE_S is also given"):
        assert edge(tmp_path).grace_s == 2
    with pytest.warns(DeprecationWarning):  # an explicit argument beats any variable, old-named or not
        assert CloudSettings(bundle=tmp_path, max_batch=3).max_request_batch == 3


def test_old_names_in_the_edge_config_file(tmp_path, monkeypatch):
    config = tmp_path / "edge.yaml"
    config.write_text("graceful_shutdown_s: 5\nmax_pending: 9\nlog_level: WARNING\n")
    with pytest.warns(DeprecationWarning) as warned:
        s = EdgeSettings.load(config, bundle=tmp_path, server="127.0.0.1:1")
    assert {str(w.message) for w in warned} == {"graceful_shutdown_s is deprecated; use grace_s",
                                                "max_pending is deprecated; use max_inflight"}
    assert (s.grace_s, s.max_inflight, s.log_level) == (5, 9, "warning")
    assert s.max_pending == 9  # the read-only old name, for readers not yet switched


def test_the_old_cloud_flag_still_works(tmp_path, monkeypatch):
    import cloud_server.server
    from cloud_server.cli import app

    seen = []
    monkeypatch.setattr(cloud_server.server, "serve", lambda settings: seen.append(settings) or 0)
    runner = CliRunner()
    with pytest.warns(DeprecationWarning, match="--max-batch is deprecated; use --max-request-batch"):
        result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--max-batch", "8", "--log-level", "DEBUG"])
    assert result.exit_code == 0, result.output
    assert seen[-1].max_request_batch == 8 and seen[-1].log_level == "debug"
    with pytest.warns(DeprecationWarning, match="--max-batch is deprecated and ignored"):
        result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--max-request-batch", "9",
                                     "--max-batch", "8"])
    assert result.exit_code == 0, result.output
    assert seen[-1].max_request_batch == 9
    assert "--max-request-batch" in runner.invoke(app, ["serve", "--help"]).output
