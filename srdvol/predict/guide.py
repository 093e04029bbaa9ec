"""Filtering a denoised patch's activity with the recording's mean image (``--guide``).

In a calcium recording a cell's fluorescence is its resting brightness times ``1 + ΔF/F``: inside
a cell, the activity of every pixel is the cell's trace scaled by that pixel's resting
brightness. The recording's mean image shows that resting brightness almost without noise (it
averages hundreds of frames), so it can tell the activity that follows a cell's shape from the
noise that does not. With ``--guide R`` every frame of every denoised patch becomes::

    guided = M + GF_R(denoised - M; guide M)

where ``M`` is the input's mean image and ``GF_R`` a guided filter (K. He, J. Sun and X. Tang,
"Guided image filtering", IEEE TPAMI 35(6), 2013): in every window of ``(2R+1)²`` pixels the
activity is fitted as a straight line of ``M``, and the fits of the windows covering a pixel are
averaged, each weighted by how well it fits (``1 / (residual variance + eps)``), so that windows
straddling sources with different activity (a cell's rim and its surroundings) count less than
in He et al.'s plain average (which kept less of the transients' amplitude:
benchmarks/RESULTS.md). Activity proportional to the mean image within a few pixels (a soma, a
bright dendrite) passes; fine noise does not. The patch's temporal detail is untouched: each
frame is filtered on its own, with the same guide.

It assumes a still recording: the mean image must show where the structures of each frame are.
A recording with uncorrected motion should be registered first (or denoised without it).

The mean image is :func:`mean_image` of the whole input (about :data:`GUIDE_FRAMES` frames
spread over the recording, taken from as few of its storage chunks as hold them), the same for
every patch, so the output does not depend on the blocks. Like
``--anchor`` it runs on each patch inside the predictor (after the network and ``--tta``, before
the anchoring), where the blending window gives a patch's reflected edges little weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from srdvol.core.frames import frames_of_few_chunks

__all__ = [
    "GUIDE_CHUNKS",
    "GUIDE_EPS",
    "GUIDE_FRAMES",
    "guide_frames",
    "guided_filter",
    "mean_image",
]

#: Regularisation of the fits, in the predictor's normalised units squared (a window whose mean
#: image varies by less than 0.1 of the input's std is treated as flat: its activity is averaged).
GUIDE_EPS = 0.01

#: The frames the mean image averages: all, or about this many, evenly spread.
GUIDE_FRAMES = 256

#: The fewest storage chunks the mean image reads (or all), evenly spread over the recording, so
#: that a recording stored in long chunks is not averaged over one stretch of it.
GUIDE_CHUNKS = 8


def guide_frames(frames: int, chunks: Sequence[int] | None = None) -> np.ndarray:
    """Indices of the frames :func:`mean_image` averages.

    Parameters
    ----------
    frames
        Length of the recording.
    chunks
        The storage's chunk lengths along t. ``None``: all frames, or :data:`GUIDE_FRAMES`
        evenly spaced ones. Given: every frame of the fewest chunks that hold
        :data:`GUIDE_FRAMES` frames (at least :data:`GUIDE_CHUNKS`, or all), evenly spread,
        since reading one frame costs its whole chunk.
    """
    return frames_of_few_chunks(frames, GUIDE_FRAMES, chunks, at_least=GUIDE_CHUNKS)


def mean_image(movie: Any, axis: int = 0, chunks: Sequence[int] | None = None) -> Any:
    """The mean over ``axis`` (time) of the frames :func:`guide_frames` picks, float32.

    Works on numpy and dask arrays alike; frames are summed in float64, so integer data give
    the same image whatever the chunking. ``chunks`` are the storage's chunk lengths along
    ``axis`` (see :func:`guide_frames`); pass a dask array's own (``movie.chunks[axis]``) to
    read as few of its chunks as the image needs.
    """
    picked = guide_frames(movie.shape[axis], chunks)
    every = len(picked) == movie.shape[axis]
    taken = movie if every else movie[(slice(None),) * (axis % movie.ndim) + (picked,)]
    # summed in float64 as it goes: no float64 copy of the frames (8 bytes per input voxel)
    return (taken.sum(axis=axis, dtype=np.float64) / len(picked)).astype(np.float32)


def guided_filter(
    activity: Any,
    guide: Any,
    radius: int,
    eps: float = GUIDE_EPS,
    weight_eps: float | None = None,
) -> Any:
    """The guided filter of every frame of ``activity`` with one guide image per patch.

    Parameters
    ----------
    activity
        Torch tensor ``(n, t, y, x)``.
    guide
        Torch tensor ``(n, y, x)`` on the same device, in the same units.
    radius
        Window radius in pixels (windows of ``2 radius + 1``); at most ``min(y, x) - 1``
        (borders are reflected).
    eps
        Regularisation of each window's slope, in the units of ``guide`` squared.
    weight_eps
        The one of the windows' weights (``None``: ``eps``); apart only to measure each
        (benchmarks/issue13/guide_frontier.py).

    Returns
    -------
    Tensor
        ``(n, t, y, x)``: per pixel, the mean over the windows covering it of ``a * guide + b``,
        with ``a, b`` the least-squares fit of the activity on the guide in each window (``a``
        shrunk by ``eps``), each window weighted by ``1 / (its fit's residual variance +
        weight_eps)``.
    """
    import torch.nn.functional as F

    n, t, h, w = activity.shape
    size = 2 * radius + 1

    def box(values: Any) -> Any:
        # mean over each window, borders reflected (scipy's uniform_filter, mode="mirror")
        padded = F.pad(values, (radius, radius, radius, radius), mode="reflect")
        return F.avg_pool2d(padded, size, stride=1)

    image = guide.reshape(n, 1, h, w).to(activity.dtype)
    mean_i = box(image)
    var_i = box(image * image) - mean_i * mean_i
    p = activity.reshape(n, t, h, w)
    mean_p = box(p)
    cov = box(image * p) - mean_i * mean_p
    slope = cov / (var_i + eps)
    offset = mean_p - slope * mean_i
    residual = (box(p * p) - mean_p * mean_p - slope * cov).clamp_min(0)
    weight = 1.0 / (residual + (eps if weight_eps is None else weight_eps))
    return (box(weight * slope) * image + box(weight * offset)) / box(weight)
