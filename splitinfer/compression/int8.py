"""int8 post-training quantization of a head, per segment.

``quantize_int8`` quantizes a module with PyTorch's FX graph mode (x86 backend: fbgemm/oneDNN int8 kernels),
calibrated on a few batches of real inputs; the result takes and returns float tensors.
``int8_head`` does this per segment of a staged head (segments end at exit boundaries and at the split, so
early exits still see float tensors at their boundaries). The bundle's int8 head is built here at load.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from splitinfer.staged import StagedModel


def quantize_int8(module: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``module`` (FX post-training static quantization, x86 qconfig), calibrated on
    ``calibration`` batches."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration batch")
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation on every call
        m = copy.deepcopy(module).eval()
        prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), example_inputs=(calibration[0][:1],))
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared).eval()


class SegmentedHead(nn.Module):
    """A head run as consecutive segments (``run(x, start, end)`` between cut boundaries, like a staged model)."""

    def __init__(self, cuts: list[int], segments: list[nn.Module]):
        super().__init__()
        self.cuts = list(cuts)
        self.segments = nn.ModuleList(segments)

    def run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run from boundary ``start`` to ``end``; both must be cut points."""
        i, j = self.cuts.index(start), self.cuts.index(end)
        for seg in self.segments[i:j]:
            x = seg(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.cuts[0], self.cuts[-1])


def int8_head(staged: StagedModel, split: int, calibration: torch.Tensor, cuts: list[int] | None = None,
              batch: int = 128) -> SegmentedHead:
    """Quantize ``stages[:split]`` to int8, one segment between consecutive ``cuts`` (0 and ``split`` added)."""
    points = sorted({0, split, *(c for c in (cuts or []) if 0 < c < split)})
    segments = []
    x = calibration
    for a, b in zip(points, points[1:], strict=False):
        seg = nn.Sequential(*staged.stages[a:b])
        batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        segments.append(quantize_int8(seg, batches))
        with torch.no_grad():
            x = torch.cat([seg(t.clone()) for t in batches])
    return SegmentedHead(points, segments)
