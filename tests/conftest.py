"""Shared fixtures: small bundles built from the untrained default model, and free loopback ports. The builders
themselves live in :mod:`tests.support.bundles`."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitinfer import daemons
from tests.support.bundles import make_learned_bundle, make_test_bundle


@pytest.fixture(scope="session")
def learned_bundle_dir(tmp_path_factory) -> Path:
    """Session-wide bundle with a learned bottleneck codec at split 8 (random weights)."""
    return make_learned_bundle(tmp_path_factory.mktemp("learned") / "default")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """Session-wide test bundle (random weights, split 9, exits at 4 and 8 with threshold 0.5)."""
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "default")


@pytest.fixture(scope="session")
def free_port():
    """A function returning a currently free TCP port on 127.0.0.1."""
    return daemons.free_port
