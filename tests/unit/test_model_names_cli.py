"""`plan models` lists every model `--model` takes; a wrong ViT input size is refused before staging."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from partitioner.cli import app

pytest.importorskip("torchvision")


def test_plan_models_lists_embedded_and_every_torchvision_model_with_published_figures():
    from splitinfer.models import EMBEDDED_MODELS, torchvision_names

    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(EMBEDDED_MODELS) | set(torchvision_names())
    assert rows["vit_fmnist"]["kind"] == "embedded" and rows["vit_fmnist"]["input_shape"] == [1, 28, 28]
    assert rows["resnet50"]["num_params"] == 25557032 and rows["resnet50"]["input_shape"] == [3, 224, 224]
    assert rows["vit_h_14"]["input_shape"] == [3, 518, 518]
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and "swin_t" in table.stdout


def test_a_vit_at_another_input_size_is_refused_with_its_size(tmp_path):
    res = CliRunner().invoke(app, ["profile", "--model", "vit_b_32", "--input-shape", "3,64,64", "--out",
                                   str(tmp_path / "p.json"), "--no-progress"])
    assert res.exit_code != 0
    assert "vit_b_32 takes only its published input size 3,224,224" in res.output
    assert "Traceback" not in res.output
