"""Image-quality metrics of a denoised movie against its ground truth, computed out of core.

Every metric is a dask reduction over the lazy arrays (blocks of whole frames), so arrays larger
than memory are evaluated with bounded memory. A *frame* is one (y, x) image: every index of the
axes before y and x other than time (for example each (t, z) plane) is its own frame.

Definitions
-----------
snr_db
    As the SRDTrans authors: per frame ``20 log10(||GT - offset|| / ||estimate - GT||)``, averaged
    over frames. ``offset`` is the detector baseline (the simulator records it in the truth
    store); subtracting it keeps a constant from inflating the score. With ``offset=0`` this is the
    authors' definition on raw intensities.
psnr_db
    ``10 log10(range² / MSE)`` over the whole array, ``range = max(GT) - min(GT)``.
ssim
    Gaussian-window SSIM (Wang et al. 2004: sigma 1.5, 11 x 11 window, K1 0.01, K2 0.03, no
    sample-covariance correction, reflect padding, a 5-pixel border left out), per frame in y, x,
    averaged over frames; the data range is that of the truth (``psnr``'s ``range``).
pearson_r
    Pixel-wise Pearson correlation over the whole array.
trace_r
    Mean over cells of the Pearson correlation between the cell's mean trace (mean over its label
    pixels, per time point) in the estimate and in the truth. Pearson r is invariant to affine
    maps, so it equals the correlation of ΔF/F traces.
trace_gain
    Median over cells of the transient gain: the least-squares slope (with intercept) of the
    estimate's cell trace on the truth's, ``cov / var(truth)``; 1 = amplitudes kept, < 1 =
    flattened.
pixel_r, pixel_gain
    The same per pixel inside the cell labels (each labelled pixel's time series against the
    truth's): the mean of the correlations and the median of the gains over those pixels.

:mod:`srdvol.core.traces` defines the trace statistics; :func:`gaussian_frames` is the reference
filter that evaluation compares a denoiser with.
"""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.utils import parse_bytes
from scipy import ndimage

from srdvol.core.traces import check_masks, fit_traces, label_sums, pixel_fit, pixel_sums
from srdvol.errors import ConfigError, InputError

__all__ = [
    "SSIM_SIGMA",
    "as_movie",
    "cell_trace_fit",
    "cell_traces",
    "evaluate",
    "frame_ssim",
    "gaussian_frames",
]

#: Gaussian window of SSIM (sigma 1.5 px, truncated at 3.5 sigma: an 11 x 11 window).
SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_BORDER = 5
_K1, _K2 = 0.01, 0.03
_BLOCK_BYTES = "16MiB"


def frame_ssim(estimate: np.ndarray, truth: np.ndarray, *, data_range: float) -> float:
    """Mean Gaussian-window SSIM of one (y, x) frame (see the module docstring).

    Parameters
    ----------
    estimate, truth
        Two frames of the same shape.
    data_range
        Dynamic range ``L`` of the data (the truth's max - min over the whole movie).

    Returns
    -------
    float
        Mean SSIM over the frame, border excluded when the frame is large enough.
    """
    x = np.asarray(estimate, np.float64)
    y = np.asarray(truth, np.float64)

    def smooth(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, mode="reflect", truncate=_SSIM_TRUNCATE)

    mx, my = smooth(x), smooth(y)
    vx = smooth(x * x) - mx * mx
    vy = smooth(y * y) - my * my
    cxy = smooth(x * y) - mx * my
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    b = _SSIM_BORDER
    if ssim.shape[0] > 2 * b and ssim.shape[1] > 2 * b:
        ssim = ssim[b:-b, b:-b]
    return float(ssim.mean())


def as_movie(array: Any) -> da.Array:
    """Dask array of a DataArray, dask or numpy image; a DataArray is put in (t, ..., y, x) order.

    Parameters
    ----------
    array
        An image with time first and y, x last (any order for a DataArray with named dims).
    """
    if hasattr(array, "dims") and hasattr(array, "data"):
        dims = list(array.dims)
        if {"t", "y", "x"} <= set(dims):
            middle = [d for d in dims if d not in ("t", "y", "x")]
            array = array.transpose("t", *middle, "y", "x")
        array = array.data
    return array if isinstance(array, da.Array) else da.asarray(array)


def _name(array: Any, default: str) -> str:
    attrs = getattr(array, "attrs", None) or {}
    return str(attrs.get("source") or default)


def _frame_blocks(estimate: da.Array, truth: da.Array) -> tuple[da.Array, da.Array]:
    """Rechunk both arrays identically into blocks of whole (y, x) frames."""
    truth = _whole_frames(truth)
    return estimate.rechunk(truth.chunks), truth


def _whole_frames(a: da.Array) -> da.Array:
    """Rechunk into blocks of whole (y, x) frames of at most ~16 MiB (or dask's chunk-size)."""
    nd = a.ndim
    spec: dict[int, Any] = {nd - 2: -1, nd - 1: -1}
    spec.update({i: "auto" for i in range(nd - 2)})
    # Small blocks: a reduction holds several float64 temporaries per block and thread.
    limit = min(parse_bytes(_BLOCK_BYTES), parse_bytes(dask.config.get("array.chunk-size")))
    with dask.config.set({"array.chunk-size": limit}):
        return a.rechunk(spec)


def _ssim_block(e: np.ndarray, g: np.ndarray, *, data_range: float) -> np.ndarray:
    lead = e.shape[:-2]
    fe = e.reshape(-1, *e.shape[-2:])
    fg = g.reshape(-1, *g.shape[-2:])
    out = [frame_ssim(a, b, data_range=data_range) for a, b in zip(fe, fg, strict=True)]
    return np.asarray(out, np.float64).reshape(lead)


def cell_traces(image: Any, masks: np.ndarray) -> np.ndarray:
    """Mean trace of every label: array (t, max label + 1), column 0 is the background.

    Parameters
    ----------
    image
        A (t, ..., y, x) DataArray, dask or numpy array.
    masks
        Integer labels shaped like one time point of ``image``.

    Returns
    -------
    numpy.ndarray
        Per time point, the mean of each label's pixels (NaN for labels without pixels).
    """
    a = as_movie(image)
    labels, n_labels = check_masks(masks, a.shape)
    g = _whole_frames(a.astype(np.float64))
    sums = label_sums(g, labels, n_labels).compute()
    counts = np.bincount(labels.ravel(), minlength=n_labels).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def evaluate(
    estimate: Any, truth: Any, *, masks: np.ndarray | None = None, offset: float = 0.0
) -> dict[str, float]:
    """Compare an estimate with the ground truth (out of core).

    Parameters
    ----------
    estimate, truth
        Arrays of the same shape with time first and y, x last: ``xarray.DataArray`` (dims are
        reordered so y, x come last), dask or numpy arrays.
    masks
        Integer cell labels (0 = background), shape = the image shape without the time axis.
        Needed for the trace scores.
    offset
        Detector baseline subtracted from the truth in the SNR numerator.

    Returns
    -------
    dict
        ``snr_db``, ``psnr_db``, ``ssim``, ``pearson_r``, ``mse``, ``data_range``, ``frames``,
        and with masks ``trace_r``, ``trace_gain``, ``n_cells``, ``pixel_r``, ``pixel_gain``
        and ``n_pixels`` (see the module docstring).

    Raises
    ------
    InputError
        If the shapes differ, the arrays have fewer than 3 dimensions, or masks do not fit.
    """
    e_name, g_name = _name(estimate, "estimate"), _name(truth, "truth")
    e, g = as_movie(estimate), as_movie(truth)
    if e.shape != g.shape:
        raise InputError(
            f"{e_name} vs {g_name}",
            f"shapes differ ({e.shape} vs {g.shape})",
            "compare an image with the ground truth of the same movie",
        )
    if g.ndim < 3:
        raise InputError(g_name, f"has {g.ndim} dimensions", "give a (t, ..., y, x) movie")
    e, g = _frame_blocks(e.astype(np.float64), g.astype(np.float64))
    diff = e - g
    frame_axes = (g.ndim - 2, g.ndim - 1)
    sig2, err2, gmin, gmax, mse, emean, gmean = dask.compute(
        ((g - offset) ** 2).sum(axis=frame_axes),
        (diff**2).sum(axis=frame_axes),
        g.min(),
        g.max(),
        (diff**2).mean(),
        e.mean(),
        g.mean(),
    )
    data_range = float(gmax - gmin)
    ec, gc = e - emean, g - gmean
    lazy: dict[str, Any] = {
        "cov": (ec * gc).sum(),
        "ve": (ec * ec).sum(),
        "vg": (gc * gc).sum(),
        "ssim": da.map_blocks(
            _ssim_block,
            e,
            g,
            data_range=data_range if data_range > 0 else 1.0,
            drop_axis=list(frame_axes),
            dtype=np.float64,
        ).mean(),
    }
    labels = None
    if masks is not None:
        labels, n_labels = check_masks(masks, g.shape)
        lazy["e_tr"] = label_sums(e, labels, n_labels)
        lazy["g_tr"] = label_sums(g, labels, n_labels)
        # Per-pixel fits stay lazy; only the labelled pixels' values are gathered.
        pixel_r, pixel_gain = pixel_fit(pixel_sums(ec, gc), g.shape[0])
        lazy["pixel_r"] = pixel_r[labels > 0]
        lazy["pixel_gain"] = pixel_gain[labels > 0]
    done = dask.compute(lazy)[0]
    with np.errstate(divide="ignore"):
        snr = 10 * np.log10(np.asarray(sig2) / np.asarray(err2))
    den = math.sqrt(done["ve"] * done["vg"])
    result = {
        "snr_db": float(np.mean(snr)),
        "psnr_db": float(10 * math.log10(data_range**2 / mse)) if mse > 0 else math.inf,
        "ssim": float(done["ssim"]),
        "pearson_r": float(done["cov"] / den) if den > 0 else math.nan,
        "mse": float(mse),
        "data_range": data_range,
        "frames": int(np.asarray(sig2).size),
    }
    if labels is not None:
        result.update(_trace_scores(done, labels, n_labels))
    return result


def _nan_stat(fn: Any, values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(fn(finite)) if finite.size else math.nan


def _trace_scores(done: dict[str, Any], labels: np.ndarray, n_labels: int) -> dict[str, Any]:
    """Per-cell and per-pixel trace scores from the computed sums (module docstring)."""
    counts = np.bincount(labels.ravel(), minlength=n_labels)
    cells = np.nonzero(counts[1:])[0] + 1
    r, gain = fit_traces(done["e_tr"][:, cells], done["g_tr"][:, cells])
    return {
        "trace_r": _nan_stat(np.mean, r),
        "trace_gain": _nan_stat(np.median, gain),
        "n_cells": int(cells.size),
        "pixel_r": _nan_stat(np.mean, np.asarray(done["pixel_r"])),
        "pixel_gain": _nan_stat(np.median, np.asarray(done["pixel_gain"])),
        "n_pixels": int((labels > 0).sum()),
    }


def cell_trace_fit(estimate: Any, truth: Any, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Correlation and gain of every cell's trace (see :mod:`srdvol.core.traces`).

    Parameters
    ----------
    estimate, truth
        (t, ..., y, x) images of one shape (DataArray, dask or numpy).
    masks
        Integer labels shaped like one time point.

    Returns
    -------
    dict
        ``labels`` (the labels that have pixels), ``r`` and ``gain`` (one value per label),
        ``estimate`` and ``truth`` (their mean traces, (t, labels)).
    """
    labels, _ = check_masks(masks, as_movie(truth).shape)
    e_tr, g_tr = cell_traces(estimate, labels), cell_traces(truth, labels)
    cells = np.nonzero(np.bincount(labels.ravel())[1:])[0] + 1
    r, gain = fit_traces(e_tr[:, cells], g_tr[:, cells])
    return {
        "labels": cells,
        "r": r,
        "gain": gain,
        "estimate": e_tr[:, cells],
        "truth": g_tr[:, cells],
    }


def gaussian_frames(image: Any, sigma: float) -> da.Array:
    """The reference filter: a 2D Gaussian of ``sigma`` pixels over every (y, x) frame, lazily.

    Frames are filtered one by one (reflected at the frame's edges), so no time point or plane
    is mixed with another; the result is float32, with the image's shape, in (t, ..., y, x)
    order (a DataArray is put in that order first).

    Raises
    ------
    ConfigError
        If ``sigma`` is negative or not finite.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError("sigma", f"{sigma!r} is not a non-negative number", "give sigma >= 0")
    a = _whole_frames(as_movie(image))
    axes = (0.0,) * (a.ndim - 2) + (float(sigma), float(sigma))
    return a.map_blocks(
        lambda b: ndimage.gaussian_filter(b.astype(np.float32), axes, mode="reflect"),
        dtype=np.float32,
    )
