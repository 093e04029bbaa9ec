"""Casting computed values to an output dtype: integers are rounded and clipped to the dtype's
range (a denoised uint16 image never wraps around), floats are cast."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cast_to"]


def cast_to(values: Any, dtype: Any) -> np.ndarray:
    """``values`` as ``dtype``: rounded to the nearest integer and clipped to the dtype's range
    for an integer dtype, plainly cast for a float dtype."""
    dtype = np.dtype(dtype)
    array = np.asarray(values)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(dtype)
