"""How the staged form of a torchvision model compares with what torchvision publishes for it: parameters
(``num_params``) and multiply-accumulates (``_ops``, GMACs) at the published input size, and how it stages."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

MACS_TOLERANCE = 0.02  # relative difference from the published GMACs counted as a match


@dataclass
class PublishedCheck:
    """One model staged at its published input size and compared with the published figures."""

    name: str
    input_shape: list[int]
    staged: bool
    error: str = ""
    stages: int = 0
    params: int = 0
    published_params: int = 0
    gmacs: float = 0.0
    published_gmacs: float = 0.0
    seconds: float = 0.0

    @property
    def params_exact(self) -> bool:
        return self.staged and self.params == self.published_params

    @property
    def macs_rel_diff(self) -> float | None:
        """(ours - published) / published, or None when the model did not stage."""
        return self.gmacs / self.published_gmacs - 1.0 if self.staged and self.published_gmacs else None

    @property
    def macs_match(self) -> bool:
        d = self.macs_rel_diff
        return d is not None and abs(d) <= MACS_TOLERANCE

    def to_dict(self) -> dict:
        return {**asdict(self), "params_exact": self.params_exact, "macs_rel_diff": self.macs_rel_diff,
                "macs_match": self.macs_match}


def check_published(name: str) -> PublishedCheck:
    """Load ``name`` as ``plan profile --model NAME`` does (random weights, published input size), stage it and
    compare its parameter and MAC totals with torchvision's published figures. Never raises for a model that
    fails to stage: the failure is in ``error``."""
    from partitioner.target import load_target
    from splitinfer.models import torchvision_model

    published = torchvision_model(name)
    check = PublishedCheck(name=name, input_shape=list(published.input_shape), staged=False,
                           published_params=published.num_params, published_gmacs=published.gmacs)
    t0 = time.perf_counter()
    try:
        target = load_target(name)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded or staged is a finding, not a crash
        check.error = f"{type(exc).__name__}: {exc}"
    else:
        staged = target.staged
        check.staged = True
        check.stages = staged.num_stages
        check.params = sum(p.numel() for p in target.model.parameters())
        check.gmacs = staged.macs_between(0, staged.num_stages) / 1e9
        del target
    check.seconds = time.perf_counter() - t0
    return check
