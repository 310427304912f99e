"""One fast, exact check that a tensor holds no NaN or infinity (numpy arrays and torch tensors, no torch import).

``torch.isfinite(x).all()`` allocates a boolean tensor and dispatches two ops: ~40 us for a 37 kB boundary tensor
on this project's machine, a tenth of the light tail's whole server-side compute (measured with py-spy under
load). Summing is enough in the common case: a sum is finite only if every element is (NaN and infinities
propagate), so a finite sum proves the tensor finite; only a non-finite sum (a NaN or infinity, or an overflow of
large finite values) takes the elementwise check. Same answers as the elementwise check, ~10x faster.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_FAST_DTYPES = (np.float32, np.float64)


def all_finite(x: Any) -> bool:
    """True when the numpy array or torch tensor ``x`` holds no NaN or infinite value."""
    if not isinstance(x, np.ndarray):  # a torch tensor: look at its memory through numpy when the dtype allows
        if getattr(x, "device", None) is not None and str(x.device) == "cpu" and str(x.dtype) in (
                "torch.float32", "torch.float64"):
            x = x.detach().numpy()
        else:
            import torch

            return bool(torch.isfinite(x).all())
    if x.dtype.type not in _FAST_DTYPES:
        return bool(np.isfinite(x).all()) if np.issubdtype(x.dtype, np.inexact) else True
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(x.sum())
    return math.isfinite(total) or bool(np.isfinite(x).all())
