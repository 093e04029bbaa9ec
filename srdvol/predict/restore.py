"""Putting back the transient amplitudes the network shrinks, from the input itself (``--restore``).

A self-supervised network trained to the mean squared error estimates a posterior mean, which
flattens the transients it cannot tell from noise: at 0.5 photons per pixel a short training
keeps 0.70-0.75 of their amplitude (benchmarks/RESULTS.md, issue 13). ``--anchor`` puts it back
with a Gaussian of the residual, which also puts back the input's noise over a disc of about 4
pixels. This pass puts it back where the activity is instead. Over a stretch of
:data:`RESTORE_FRAMES` frames it takes the network's output ``D`` and the input ``Y`` and
returns::

    restored = S + A + P(Y - M - A)

- ``S``, the static image: the input's mean ``M`` guided-filtered (radius 1) with the network's
  mean ``D̄`` as guide. It is ``M``'s level (unbiased) with ``D̄``'s shape (nearly noise-free).
- ``A``, the activity: ``D - D̄`` guided-filtered (radius :data:`GUIDE_RADIUS`) with ``M`` as
  guide, which keeps what follows a cell's resting brightness (``--guide``, measured there).
- ``P(Y - M - A)``, the amplitude put back: in every tile of :data:`RESTORE_TILE` pixels (a global
  lattice at half a tile's stride, blended with Hann windows) the ``rank`` strongest spatial
  patterns of ``A`` over the stretch (its singular vectors: where cells and their dendrites
  light up together, found where every pixel's noise weighs the same) are fitted to each
  frame's residual by weighted least squares (weights: one over each pixel's noise variance,
  :func:`noise_variance`). A fit of photon counts to a
  footprint is unbiased, so what the network flattened comes back; the noise that comes with
  it is only that of ``rank`` numbers per tile and frame, each pooled over a whole footprint.

On the issue 13 movies at 0.5 photons per pixel (4250-step models, three seeds) this keeps
0.965-0.974 of the transients' amplitude where the network alone keeps 0.65-0.79, at 3.12-3.48 dB
above the best Gaussian filter (benchmarks/RESULTS.md). It needs whole stretches of frames: a
pattern is learnt from how a tile's activity varies over a few hundred frames, which one patch
of ``patch_t`` frames does not show (32 frames cost 1.5 dB).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from srdvol.predict.guide import GUIDE_EPS

__all__ = [
    "GUIDE_RADIUS",
    "RESTORE_FRAMES",
    "RESTORE_RANK",
    "RESTORE_TILE",
    "STATIC_EPS",
    "noise_variance",
    "restore",
    "restore_halo",
    "tile_starts",
]

#: Side of the tiles whose activity patterns carry the amplitude back, in pixels (a soma with
#: its nearest dendrites; half of it is the lattice's stride). Chosen with :data:`RESTORE_RANK`
#: on the issue 13 movies (benchmarks/RESULTS.md): larger tiles give more SNR and cell trace
#: correlation, more patterns per tile keep more of the transients' amplitude.
RESTORE_TILE = 44
#: Patterns per tile, the advice for ``--restore`` (at 44-px tiles 5 kept 0.92-0.95 of the
#: transients, 6 keeps 0.965-0.974 at about 0.25 dB less).
RESTORE_RANK = 6
#: Frames of one stretch: the patterns of a tile come from this many frames.
RESTORE_FRAMES = 256
#: The guided filter of the activity (``A``): radius in pixels.
GUIDE_RADIUS = 2
#: Frames guided-filtered at once (the filter's temporaries are several times their size).
_FRAMES_AT_ONCE = 32
#: Regularisation of the static image's guided filter, in the units of ``scale`` squared: small,
#: since its guide (the network's mean) is nearly noise-free.
STATIC_EPS = 1e-3


def tile_starts(size: int, tile: int) -> list[int]:
    """Starts of the lattice's tiles along an axis of ``size`` pixels: every ``tile // 2``
    pixels, the last one flush with the end (one tile of ``size`` when the axis is shorter)."""
    if size <= tile:
        return [0]
    step = max(1, tile // 2)
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def restore_halo(tile: int = RESTORE_TILE) -> int:
    """Pixels of context a region needs beyond its core for :func:`restore` to give the core
    exactly what a whole-frame pass gives: a tile reaching over the core, plus the guided
    filters' reach (two box filters of radius :data:`GUIDE_RADIUS`)."""
    return tile + 2 * GUIDE_RADIUS


def _guided(activity: np.ndarray, guide: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """:func:`srdvol.predict.guide.guided_filter` on numpy arrays (``(..., y, x)`` with one
    ``(y, x)`` guide), float64."""
    import torch

    from srdvol.predict.guide import guided_filter

    h, w = guide.shape
    flat = torch.from_numpy(np.ascontiguousarray(activity, dtype=np.float64).reshape(1, -1, h, w))
    image = torch.from_numpy(np.ascontiguousarray(guide, dtype=np.float64)[None])
    return guided_filter(flat, image, radius, eps).numpy().reshape(activity.shape)


def restore(
    noisy: Any,
    denoised: Any,
    *,
    scale: float,
    rank: int = RESTORE_RANK,
    tile: int = RESTORE_TILE,
    origin: tuple[int, int] = (0, 0),
    frame: tuple[int, int] | None = None,
) -> np.ndarray:
    """Restore one stretch of frames (see the module's docstring).

    Parameters
    ----------
    noisy, denoised
        The input and the network's output, ``(t, y, x)``, in the same units (float or int);
        ``t`` is one stretch (about :data:`RESTORE_FRAMES` frames).
    scale
        The data's unit of intensity (e.g. the model's normalisation std): the guided filters'
        regularisation is in its square, so the result does not depend on the region.
    rank
        Activity patterns per tile; 0 leaves out the amplitude (``S + A`` only).
    tile
        Tile side in pixels.
    origin, frame
        Where the arrays lie in the whole frame ``(y, x)`` of ``frame`` pixels (default: they
        are the whole frame). Tiles lie on the whole frame's lattice (:func:`tile_starts`);
        those not wholly inside the region are left out, so the region's pixels within
        :func:`restore_halo` of its edges that are not the frame's edges are not exact.

    Returns
    -------
    numpy.ndarray
        float32, shaped like ``denoised``.
    """
    # float32 stretches, float64 sums: a block holds a stretch of hundreds of frames
    y = np.asarray(noisy, dtype=np.float32)
    d = np.asarray(denoised, dtype=np.float32)
    if y.shape != d.shape or y.ndim != 3:
        raise ValueError(f"noisy {y.shape} and denoised {d.shape} must be one (t, y, x) shape")
    t, h, w = d.shape
    frame = (h, w) if frame is None else frame
    unit = float(scale)
    d_mean = d.mean(axis=0, dtype=np.float64)
    y_mean = y.mean(axis=0, dtype=np.float64)
    static = _guided(y_mean / unit, d_mean / unit, 1, STATIC_EPS) * unit
    activity = np.empty_like(d)
    for i in range(0, t, _FRAMES_AT_ONCE):  # the filter's temporaries for a few frames only
        part = (d[i : i + _FRAMES_AT_ONCE] - d_mean) / unit
        activity[i : i + _FRAMES_AT_ONCE] = _guided(part, y_mean / unit, GUIDE_RADIUS, GUIDE_EPS)
    activity *= unit
    if rank <= 0 or t < 2:
        return (activity + static).astype(np.float32)
    # what the network and the activity's filter flattened, and the noise
    residual = y - y_mean.astype(np.float32) - activity
    floor = 1e-6 * unit * unit
    side = (min(tile, frame[0]), min(tile, frame[1]))
    window = np.outer(np.hanning(side[0] + 2)[1:-1], np.hanning(side[1] + 2)[1:-1])
    total = np.zeros((t, h, w), np.float32)
    weight = np.zeros((h, w))
    for ty in tile_starts(frame[0], tile):
        for tx in tile_starts(frame[1], tile):
            y0, x0 = ty - origin[0], tx - origin[1]
            if y0 < 0 or x0 < 0 or y0 + side[0] > h or x0 + side[1] > w:
                continue
            region = (slice(y0, y0 + side[0]), slice(x0, x0 + side[1]))
            part = residual[:, region[0], region[1]].astype(np.float64)
            total[:, region[0], region[1]] += window * _put_back(
                activity[:, region[0], region[1]].astype(np.float64),
                part,
                noise_variance(part, y_mean[region], floor=floor),
                rank,
            )
            weight[region] += window
    del residual
    covered = weight > 0
    activity[:, covered] += total[:, covered] / weight[covered].astype(np.float32)
    activity += static.astype(np.float32)
    return activity


def noise_variance(residual: np.ndarray, mean: np.ndarray, *, floor: float) -> np.ndarray:
    """Each pixel's noise variance, ``(y, x)``: the line ``a * mean + b`` (shot noise and read
    noise: a camera's photon transfer curve) fitted over the pixels of a tile to the residual's
    variance over the stretch. The line, not each pixel's own variance: on a cell the residual
    also holds the amplitude the network flattened, which would weigh the cell's own pixels
    down (fitted over the whole frame instead of each tile, SNR and gain agree to 1e-4)."""
    observed = residual.var(axis=0).ravel()
    level = mean.ravel()
    design = np.stack([level, np.ones_like(level)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, observed, rcond=None)
    if a < 0:  # no shot noise to see: a flat variance
        a, b = 0.0, float(observed.mean())
    return np.maximum(a * mean + b, floor)


def _put_back(activity: np.ndarray, residual: np.ndarray, variance: np.ndarray, rank: int) -> Any:
    """The residual's weighted least-squares fit on the activity's ``rank`` strongest spatial
    patterns, ``(t, y, x)``.

    Both are divided by each pixel's noise std first: there every pixel's noise weighs the
    same, the patterns are the whitened activity's singular vectors, and the weighted fit is
    the projection on them (0.1 dB more SNR, 0.003 more gain than patterns of the raw activity
    at photons 0.5).
    """
    t = len(activity)
    std = np.sqrt(variance).reshape(1, -1)
    a = activity.reshape(t, -1) / std
    # right singular vectors from the small (t x t) Gram matrix: a stretch has fewer frames
    # than a tile has pixels
    values, vectors = np.linalg.eigh(a @ a.T)
    keep = np.argsort(values)[::-1][:rank]
    keep = keep[values[keep] > 1e-12 * max(values.max(), 1e-300)]
    if len(keep) == 0:
        return np.zeros_like(residual)
    patterns = (a.T @ vectors[:, keep]) / np.sqrt(values[keep])  # (pixels, k), orthonormal
    whitened = residual.reshape(t, -1) / std
    return ((whitened @ patterns) @ patterns.T * std).reshape(residual.shape)
