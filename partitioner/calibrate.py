"""``splitinfer plan calibrate-exits``: recalibrate the exit thresholds of an existing bundle in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from partitioner.make import calibration_spec, exit_config_fn
from partitioner.train import split_train_validation
from partitioner.weights import load_default
from splitinfer.bundle import PLAN_FILE, load_bundle
from splitinfer.calibration import Calibration, calibrate, collect_scores
from splitinfer.data import load_fashion_mnist, to_model_input
from splitinfer.errors import BundleError


def recalibrate_bundle(path: Path, epsilon: float, delta: float, score: str = "max_softmax",
                       mode: str = "certified", limit: int | None = None, data_dir: str | None = None) -> Calibration:
    """Calibrate the bundle's exits on the validation split and rewrite ``plan.json`` (weights untouched)."""
    bundle = load_bundle(path)
    plan = bundle.plan
    if not bundle.exits:
        raise BundleError(f"bundle {path} has no exits to calibrate")
    if plan.model.name != "default":
        raise BundleError("v1 calibrates bundles of the embedded default model (Fashion-MNIST validation split)")
    seed = int(load_default()[3]["config"]["seed"])
    train = load_fashion_mnist("train", data_dir)
    _, va_idx = split_train_validation(len(train), seed)
    if limit:
        va_idx = va_idx[:limit]
    x = to_model_input(train.images[va_idx], plan.input.mean, plan.input.std)
    scores = collect_scores(bundle.staged, bundle.exits, x, score)
    cal = calibrate(scores, epsilon, delta, score=score, mode=mode, seed=seed)
    thresholds = dict(zip(cal.boundaries, cal.thresholds, strict=True))
    rates = dict(zip(cal.boundaries, cal.exit_rates, strict=True))
    exits = [e.model_copy(update={"threshold": thresholds[e.boundary], "score": score,
                                  "val_exit_rate": round(rates[e.boundary], 5)}) for e in plan.exits]
    update = {"exits": exits, "exit_calibration": calibration_spec(cal, scores)}
    if plan.active_exits is not None:  # the drift reference: rates of the enabled exits used together
        y = np.asarray(train.labels[va_idx])
        cfg = exit_config_fn(scores, thresholds, y)(tuple(sorted(plan.active_exits)))
        update["active_exit_rates"] = {b: round(r, 5) for b, r in cfg.rates.items()}
    new_plan = plan.model_copy(update=update)
    (path / PLAN_FILE).write_text(new_plan.model_dump_json(indent=2) + "\n")
    return cal
