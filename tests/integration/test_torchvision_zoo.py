"""Every classification model of torchvision, by name, at its published input size: it stages, its parameter
count equals torchvision's ``num_params`` and its MACs match the published ``_ops`` (GMACs) within 2 %."""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")

from partitioner.published import MACS_TOLERANCE, check_published  # noqa: E402
from splitinfer.models import torchvision_names  # noqa: E402


@pytest.mark.slow  # builds and stages 80 models, up to vit_h_14 at 518x518 (about 4 minutes)
def test_every_torchvision_model_stages_with_its_published_params_and_macs():
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    assert list(torchvision_names()) == names and len(names) >= 80
    checks = [check_published(name) for name in names]
    not_staged = {c.name: c.error for c in checks if not c.staged}
    assert not not_staged, not_staged
    wrong_params = {c.name: (c.params, c.published_params) for c in checks if not c.params_exact}
    assert not wrong_params, wrong_params
    off = {c.name: round(c.macs_rel_diff, 4) for c in checks if not c.macs_match}
    assert len(off) <= 0.05 * len(checks), f"MACs off by more than {MACS_TOLERANCE:.0%}: {off}"
    assert all(c.stages >= 3 for c in checks)  # every model has interior split points
