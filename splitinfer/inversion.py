"""The inversion decoder: features (or a payload's values) -> the input image.

The attack harness (:mod:`partitioner.privacy`) trains it to measure what a split's payload reveals; the
adversarial privacy defence (:class:`splitinfer.bottleneck.InversionAdversary`) trains one against the codec's
encoder. It lives in the core because the codec's training uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class InversionDecoder(nn.Module):
    """Payload view ``[C, H, W]`` (or a vector ``[C]``) -> image ``[channels, out_h, out_w]`` in ``[0, 1]``.

    Features larger than 14x14 enter through a learned patch convolution down to about 14x14 (no information
    is thrown away before training); small or pooled ones through a linear layer onto a 64x7x7 map. Then
    3x3 convolutions at 14x14 and at the output size, with bilinear upsampling between. ``extra`` > 0 adds a
    vector input (e.g. the tail's class probabilities), mapped by a linear layer onto the same 64x7x7 grid and
    added. ``bounded``: a sigmoid maps the output into [0, 1] (pixels); without it the output is unbounded
    (normalised inputs).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int] = (1, 28, 28), extra: int = 0,
                 width: int = 64, bounded: bool = True):
        super().__init__()
        self.bounded = bounded
        shape = [int(d) for d in in_shape]
        self.out_shape = tuple(int(d) for d in out_shape)
        self.width = width
        # an image-like map; a token latent [C, L, 1] (and a vector) is decoded through a dense entry instead
        spatial = len(shape) == 3 and shape[1] >= 7 and shape[2] >= 7
        self.spatial = spatial
        if spatial:
            c, h, _ = shape
            s = max(1, h // 14)
            self.entry = nn.Sequential(nn.Conv2d(c, width, s, s) if s > 1 else nn.Conv2d(c, width, 1),
                                       nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.entry = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), width * 49), nn.ReLU(inplace=True))
        self.extra = nn.Linear(extra, width * 49) if extra else None
        mid = 16
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Conv2d(width, mid, 3, 1, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid, self.out_shape[0], 3, 1, 1))

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        h = self.entry(x)
        if not self.spatial:
            h = h.view(len(x), self.width, 7, 7)
        if self.extra is not None:
            if extra is None:
                raise ValueError("this decoder takes an extra input")
            e = self.extra(extra).view(len(x), self.width, 7, 7)
            h = h + F.interpolate(e, size=h.shape[-2:], mode="nearest")
        mid_hw = (max(7, self.out_shape[1] // 2), max(7, self.out_shape[2] // 2))
        if tuple(h.shape[-2:]) != mid_hw:
            h = F.interpolate(h, size=mid_hw, mode="bilinear", align_corners=False)
        h = self.body(h)
        h = F.interpolate(h, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        y = self.out(h)
        return torch.sigmoid(y) if self.bounded else y
