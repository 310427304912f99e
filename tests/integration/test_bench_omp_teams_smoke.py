"""bench.omp_teams runs its three layouts in child processes and reports the summary; on a machine with fewer
than 4 CPUs (two 2-thread teams oversubscribe it) the old layout shows the throttled OpenMP teams: threads going
to sleep between parallel regions, hundreds of voluntary context switches per forward pass, the new one not."""

from __future__ import annotations

import json

import pytest

from bench import omp_teams
from splitinfer.omp_teams import usable_cpus

pytestmark = pytest.mark.slow


def test_bench_omp_teams_smoke(tmp_path):
    out = tmp_path / "omp.json"
    assert omp_teams.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    s = result["summary"]
    assert set(s["ms_p50"]) == {"main", "before", "after"}
    assert s["before_vs_main"] > 0 and s["after_vs_main"] > 0
    assert {row["layout"] for row in result["rows"]} == {"main", "before", "after"}
    switches = s["voluntary_switches_per_run"]
    if usable_cpus() < 2 * omp_teams.THREADS:
        assert switches["before"] > 5 * (switches["after"] + 1), switches
