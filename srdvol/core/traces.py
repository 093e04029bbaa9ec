"""Trace fidelity: how well a denoised movie keeps the activity of cells and of their pixels.

A calcium-imaging user reads a movie as traces: the mean of a cell's pixels over time (a
*cell trace*) and, for a finer look, each pixel's own time series. Two numbers per trace,
against the ground truth's trace at the same place:

correlation ``r``
    Pearson correlation over time. It is invariant to affine maps, so it equals the
    correlation of ΔF/F traces whatever baseline F0 is used.
gain
    Least-squares slope of the estimate's ΔF on the truth's ΔF, with an intercept:
    ``cov(estimate, truth) / var(truth)``. With the intercept the choice of F0 does not matter.
    1 means transient amplitudes are kept; below 1 they are flattened (a filter that averages
    an active cell with its quiet surroundings, or a frame with its neighbours); above 1 they
    are exaggerated. Noise in the estimate that is independent of the truth does not bias it.

Both are computed out of core: cell traces are per-frame sums over label pixels
(:func:`label_sums`), pixel traces need five per-pixel sums over time (:func:`pixel_sums`), and
only the values at labelled pixels (8 bytes per pixel) are gathered for their median.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from srdvol.errors import InputError

__all__ = [
    "check_masks",
    "fit_traces",
    "label_sums",
    "pixel_fit",
    "pixel_sums",
]


def check_masks(masks: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Integer cell labels shaped like one time point of an image of ``shape``, and their count
    (the largest label + 1).

    Raises
    ------
    InputError
        If the labels are not integers or do not have the shape of one time point.
    """
    labels = np.asarray(masks)
    if labels.shape != tuple(shape[1:]) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            "masks",
            f"shape {labels.shape} / dtype {labels.dtype} does not fit {tuple(shape)}",
            "give integer labels shaped like one time point of the image",
        )
    return labels, int(labels.max()) + 1


def _block_label_sums(
    block: np.ndarray, masks: np.ndarray, n_labels: int, block_info: Any
) -> np.ndarray:
    """Per time point and label, the sum of the block's pixels (label axis replaces y, x)."""
    loc = block_info[0]["array-location"]
    lab = masks[tuple(slice(a, b) for a, b in loc[1:])].ravel()
    flat = block.reshape(block.shape[0], -1).astype(np.float64)
    sums = np.stack([np.bincount(lab, weights=row, minlength=n_labels) for row in flat])
    return sums.reshape((block.shape[0],) + (1,) * (block.ndim - 3) + (n_labels,))


def label_sums(a: da.Array, masks: np.ndarray, n_labels: int) -> da.Array:
    """Lazy (t, labels) sums of ``a`` (t, ..., y, x; blocks of whole frames) over each label."""
    chunks = (a.chunks[0], *[(1,) * len(c) for c in a.chunks[1:-2]], (n_labels,))
    sums = da.map_blocks(
        _block_label_sums,
        a,
        masks=masks,
        n_labels=n_labels,
        drop_axis=a.ndim - 1,
        chunks=chunks,
        dtype=np.float64,
    )
    return sums.sum(axis=tuple(range(1, a.ndim - 2))) if a.ndim > 3 else sums


def fit_traces(estimate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correlation and gain of matching columns of two (t, n) trace arrays.

    Returns
    -------
    r, gain
        Two arrays of n values (see the module docstring); NaN where the truth is constant.
    """
    e = np.asarray(estimate, np.float64)
    g = np.asarray(truth, np.float64)
    e = e - e.mean(axis=0)
    g = g - g.mean(axis=0)
    cov = (e * g).sum(axis=0)
    ve = (e * e).sum(axis=0)
    vg = (g * g).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where((ve > 0) & (vg > 0), cov / np.sqrt(ve * vg), np.nan)
        gain = np.where(vg > 0, cov / vg, np.nan)
    return r, gain


def pixel_sums(e: da.Array, g: da.Array) -> dict[str, da.Array]:
    """Lazy per-pixel sums over time (axis 0) of ``e``, ``g``, their squares and product.

    Centre both arrays by a constant first (their global means): the sums are then small
    numbers and the variances do not lose precision.
    """
    return {
        "e": e.sum(axis=0),
        "g": g.sum(axis=0),
        "ee": (e * e).sum(axis=0),
        "gg": (g * g).sum(axis=0),
        "eg": (e * g).sum(axis=0),
    }


def pixel_fit(sums: dict[str, Any], frames: int) -> tuple[Any, Any]:
    """Per-pixel correlation and gain from :func:`pixel_sums` (lazy or computed) of ``frames``
    time points; NaN where the truth (or, for ``r``, the estimate) is constant."""
    n = float(frames)
    cov = sums["eg"] - sums["e"] * sums["g"] / n
    ve = sums["ee"] - sums["e"] ** 2 / n
    vg = sums["gg"] - sums["g"] ** 2 / n
    lib = da if isinstance(cov, da.Array) else np
    with np.errstate(invalid="ignore", divide="ignore"):
        # A constant truth pixel leaves a rounding residue, not a variance: compare with gg.
        positive = vg > 1e-12 * sums["gg"]
        r = lib.where(positive & (ve > 0), cov / lib.sqrt(lib.maximum(ve * vg, 1e-300)), np.nan)
        gain = lib.where(positive, cov / lib.where(positive, vg, 1.0), np.nan)
    return r, gain
