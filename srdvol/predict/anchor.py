"""Anchoring a denoised patch to its input at coarse scales (``srdvol predict --anchor``).

At short training budgets the network's errors are not only noise: it shrinks small transients
and exaggerates the largest ones, cell by cell (benchmarks/RESULTS.md, issue 13). Those errors
are smooth over a cell, and at that scale the measurement itself is nearly noise-free (a
Gaussian of sigma 4 pixels averages about 200 of them) and unbiased. So the anchored estimate
takes the network's fine detail and the input's coarse intensities::

    anchored = denoised + G_sigma * (noisy - denoised)

with ``G_sigma`` a Gaussian blur in (y, x), frame by frame: the low-pass of the input plus the
high-pass of the network. Cell traces then keep their amplitudes (gain near 1) and correlate
with the truth better than either the network's or any Gaussian filter's.

With ``--guide`` the input's mean image ``M`` is known, and the correction is shaped like it::

    anchored = denoised + S * G_sigma * (noisy - denoised),   S = F / G_sigma * F

where ``F`` is ``M`` above its background (its :data:`BACKGROUND_PERCENTILE`-th percentile over
the patch). A Gaussian spreads a cell's missing amplitude over its surroundings; ``S`` (1 where
``F`` is flat, more than 1 on a cell, less beside it, at most :data:`SHAPE_MAX`) puts it back
where the cell is, since a cell's activity follows its resting brightness. Measured on issue
13's acceptance models: the transient gain that ``--guide`` cost comes back, pixel traces stay
above the best Gaussian's (benchmarks/RESULTS.md).

It runs on each patch, inside the predictor, so the engine's blocks, halos and exactness are
untouched; near a patch's edge the blur reflects the patch, where the blending window gives
the patch little weight.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BACKGROUND_PERCENTILE",
    "SHAPE_MAX",
    "anchor_to_input",
    "gaussian_kernel",
    "shape_of",
]

#: The mean image's background over a patch: this percentile of its pixels.
BACKGROUND_PERCENTILE = 5.0

#: The most a pixel's share of the coarse correction is raised (a lone bright pixel, such as a
#: hot one, would otherwise take up to ``2 pi sigma²`` times the correction's noise).
SHAPE_MAX = 4.0


def gaussian_kernel(sigma: float, size: int) -> list[float]:
    """Normalised 1-D Gaussian taps, radius ``ceil(4 sigma)`` capped at ``size - 1`` (the most a
    reflecting pad of an axis of ``size`` pixels allows)."""
    radius = max(0, min(math.ceil(4 * sigma), size - 1))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(taps)
    return [t / total for t in taps]


def anchor_to_input(noisy: Any, denoised: Any, sigma: float, image: Any = None) -> Any:
    """``denoised + G_sigma * (noisy - denoised)`` for torch patches ``(n, t, y, x)``.

    Parameters
    ----------
    noisy, denoised
        The network's input and output, float tensors of one shape on one device (any units,
        the same for both: the map is linear).
    sigma
        Gaussian standard deviation in pixels of (y, x); 0 returns ``denoised`` unchanged.
    image
        The input's mean image over each patch, ``(n, y, x)`` (``--guide``), or None. Given,
        the correction of every frame is multiplied by :func:`shape_of` the image.

    Returns
    -------
    Tensor
        The anchored patches, shaped like ``denoised``.
    """
    if sigma <= 0:
        return denoised
    n, t, h, w = denoised.shape
    residual = _blur((noisy - denoised).reshape(n * t, 1, h, w), sigma).reshape(n, t, h, w)
    if image is not None:
        residual = residual * shape_of(image, sigma)[:, None]
    return denoised + residual


def shape_of(image: Any, sigma: float) -> Any:
    """Each pixel's share ``S = F / G_sigma * F`` of the coarse correction, ``(n, y, x)``.

    ``F`` is ``image`` (``(n, y, x)``, a tensor) less its :data:`BACKGROUND_PERCENTILE`-th
    percentile over each patch, floored at a thousandth of its range so that a flat patch
    gives ``S = 1`` everywhere (the plain Gaussian anchor); ``S`` is capped at
    :data:`SHAPE_MAX`.
    """
    import torch

    flat = image.reshape(len(image), -1)
    background = torch.quantile(flat, BACKGROUND_PERCENTILE / 100, dim=1)
    span = (flat.amax(dim=1) - background).clamp_min(1e-6)  # a flat patch: any floor
    floor = (1e-3 * span)[:, None, None]
    above = torch.maximum(image - background[:, None, None], floor)
    spread = _blur(above[:, None], sigma)[:, 0]
    return (above / spread).clamp_max(SHAPE_MAX)


def _blur(planes: Any, sigma: float) -> Any:
    """A separable Gaussian of (y, x) over ``(m, 1, y, x)`` planes, borders reflected."""
    import torch
    import torch.nn.functional as F

    h, w = planes.shape[-2:]
    for axis, size in ((2, h), (3, w)):
        taps = torch.tensor(gaussian_kernel(sigma, size), dtype=planes.dtype)
        radius = (len(taps) - 1) // 2
        shape = (1, 1, len(taps), 1) if axis == 2 else (1, 1, 1, len(taps))
        pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
        planes = F.conv2d(F.pad(planes, pad, mode="reflect"), taps.reshape(shape).to(planes.device))
    return planes
