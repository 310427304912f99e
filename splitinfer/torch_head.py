"""The torch stage backend of :mod:`splitinfer.head`: a staged model (or an int8 head) and its exit heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from splitinfer.finite import all_finite
from splitinfer.staged import StagedModel

if TYPE_CHECKING:
    from splitinfer.compression.int8 import SegmentedHead


class TorchStages:
    """:class:`splitinfer.head.StageBackend` over torch modules.

    ``staged`` runs any stage range; ``head`` (optional) is what runs the edge's own ranges -- an
    int8 :class:`~splitinfer.compression.int8.SegmentedHead` runs the ranges between its cuts, every other range
    (the on-device tail of a degraded answer) runs in ``staged``. Exit logits leave as float32 numpy.
    Call under ``torch.inference_mode()`` (or ``no_grad``) when no gradients are wanted.
    """

    def __init__(self, staged: StagedModel, exits: Mapping[int, nn.Module] | None = None,
                 head: SegmentedHead | None = None):
        self.staged = staged
        self.exits = dict(exits or {})
        self.head = head
        self._cuts = None if head is None else frozenset(head.cuts)
        self.num_stages = staged.num_stages

    def run(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Boundary ``start`` tensor in, boundary ``end`` tensor out."""
        if self._cuts is not None and start in self._cuts and end in self._cuts and start < end:
            return self.head.run(h, start, end)
        return self.staged.run(h, start, end)

    def exit_logits(self, boundary: int, h: torch.Tensor) -> np.ndarray:
        """The exit head's logits for ``h`` as float32 numpy ``[B, classes]``."""
        return self.exits[boundary](h).detach().float().numpy()

    def all_finite(self, h: torch.Tensor) -> bool:
        return all_finite(h)
