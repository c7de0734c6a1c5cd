"""Tensors and arrays: one conversion for every place that hands a tensor to numpy (plots, the dashboard, probes)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_numpy"]


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """``x`` (a torch tensor on any device, with or without grad, or anything array-like) as a numpy array.

    bfloat16 / float16 tensors become float32 first (numpy has no bfloat16); ``dtype`` then casts.
    """
    if hasattr(x, "detach"):
        t = x.detach()
        if t.is_floating_point() and t.dtype.itemsize < 4:
            t = t.float()
        x = t.cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
