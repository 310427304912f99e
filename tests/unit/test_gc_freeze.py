"""freeze_loaded: long-lived objects leave the collector's generations; disabled by the environment."""

from __future__ import annotations

import gc

from splitinfer.gc_freeze import DISABLE_ENV, freeze_loaded


def test_freeze_moves_live_objects_out_of_the_generations(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    try:
        kept = [[i] for i in range(10_000)]  # tracked containers that stay alive
        frozen = freeze_loaded()
        assert frozen == gc.get_freeze_count() >= len(kept)
        probe = kept[123]
        assert not any(o is probe for o in gc.get_objects())  # out of every generation the collector walks
        again = freeze_loaded()  # idempotent: unfreezes, collects, freezes the same survivors
        assert abs(again - frozen) < len(kept)
    finally:
        gc.unfreeze()


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")
    before = gc.get_freeze_count()
    assert freeze_loaded() == 0
    assert gc.get_freeze_count() == before
