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

It runs on each patch, inside the predictor, so the engine's blocks, halos and exactness are
untouched; near a patch's edge the blur reflects the patch, where the blending window gives
the patch little weight.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["anchor_to_input", "gaussian_kernel"]


def gaussian_kernel(sigma: float, size: int) -> list[float]:
    """Normalised 1-D Gaussian taps, radius ``ceil(4 sigma)`` capped at ``size - 1`` (the most a
    reflecting pad of an axis of ``size`` pixels allows)."""
    radius = max(0, min(math.ceil(4 * sigma), size - 1))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(taps)
    return [t / total for t in taps]


def anchor_to_input(noisy: Any, denoised: Any, sigma: float) -> Any:
    """``denoised + G_sigma * (noisy - denoised)`` for torch patches ``(n, t, y, x)``.

    Parameters
    ----------
    noisy, denoised
        The network's input and output, float tensors of one shape on one device (any units,
        the same for both: the map is linear).
    sigma
        Gaussian standard deviation in pixels of (y, x); 0 returns ``denoised`` unchanged.

    Returns
    -------
    Tensor
        The anchored patches, shaped like ``denoised``.
    """
    if sigma <= 0:
        return denoised
    import torch
    import torch.nn.functional as F

    n, t, h, w = denoised.shape
    residual = (noisy - denoised).reshape(n * t, 1, h, w)
    for axis, size in ((2, h), (3, w)):
        taps = torch.tensor(gaussian_kernel(sigma, size), dtype=residual.dtype)
        radius = (len(taps) - 1) // 2
        shape = (1, 1, len(taps), 1) if axis == 2 else (1, 1, 1, len(taps))
        pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
        residual = F.conv2d(
            F.pad(residual, pad, mode="reflect"), taps.reshape(shape).to(residual.device)
        )
    return denoised + residual.reshape(n, t, h, w)
