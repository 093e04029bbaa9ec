"""omero rendering hints of an output: a grey channel per channel, with a display window.

The window is the 0.1 and 99.9 percentiles of one storage chunk of the input in the middle of
the recording (the output is in input intensity units), so a viewer opens the denoised movie
with a sensible contrast without reading it. ``min``/``max`` are the dtype range for integers
and the sample range for floats; a sample without finite values falls back to the dtype range.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["omero_hints"]


def omero_hints(
    like: xr.DataArray, *, dtype: np.dtype[Any], name: str = "denoised"
) -> dict[str, Any]:
    """Rendering hints for an output shaped like ``like``: one grey channel per channel.

    Parameters
    ----------
    like
        The input image (output values are in its intensity units).
    dtype
        The output dtype (clips the window's range for integer outputs).
    name
        Image name; channels are labelled ``"<name> channel <i>"`` (``i`` counts from the
        input channel read, ``like.attrs["channel"]``).

    Returns
    -------
    dict
        The ``omero`` metadata: ``channels`` (label, colour, window) and ``rdefs`` (greyscale,
        the middle time point and plane shown first).
    """
    low, high, lo_range, hi_range = _window(like, dtype)
    n_channels = int(like.sizes.get("c", 1))
    first = like.attrs.get("channel") or 0
    channels = [
        {
            "label": f"{name} channel {first + i}",
            "color": "FFFFFF",
            "active": True,
            "window": {"start": low, "end": high, "min": lo_range, "max": hi_range},
        }
        for i in range(n_channels)
    ]
    mid_t = int(like.sizes["t"]) // 2
    return {
        "channels": channels,
        "rdefs": {
            "model": "greyscale",
            "defaultT": mid_t,
            "defaultZ": int(like.sizes.get("z", 1)) // 2,
        },
    }


def _window(like: xr.DataArray, dtype: np.dtype[Any]) -> tuple[float, float, float, float]:
    if np.dtype(like.dtype).kind in "iu":
        info = np.iinfo(like.dtype)
        lo_range, hi_range = float(info.min), float(info.max)
    else:
        lo_range, hi_range = 0.0, 1.0
    sample = _sample(like)
    finite = sample[np.isfinite(sample)] if sample is not None else np.empty(0)
    if finite.size == 0:
        return lo_range, hi_range, lo_range, hi_range
    low, high = (float(v) for v in np.percentile(finite, [0.1, 99.9]))
    if high <= low:
        high = low + 1.0
    if np.dtype(like.dtype).kind == "f":
        lo_range, hi_range = min(float(finite.min()), low), max(float(finite.max()), high)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo_range, hi_range = max(lo_range, float(info.min)), min(hi_range, float(info.max))
    return low, high, lo_range, hi_range


def _sample(like: xr.DataArray) -> np.ndarray | None:
    """One storage chunk at the middle frame of the first movie (cheap: one chunk read)."""
    data = like.data
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    index = []
    for axis, sizes in zip(like.dims, data.chunks, strict=True):
        if axis == "t":
            bounds = np.cumsum((0, *sizes))
            index.append(int(np.searchsorted(bounds, like.sizes["t"] // 2, side="right")) - 1)
        else:
            index.append(0)
    try:
        block = np.asarray(data.blocks[tuple(index)].compute(scheduler="sync"), dtype=np.float64)
    except (OSError, ValueError):
        return None
    return block
