"""Training pairs from noisy data alone: spatial and temporal redundancy, augmentation, `auto`.

Both samplers rest on one fact: shot noise is independent between pixels and between frames,
the signal is not. A network trained to predict one noisy sample from another that shares its
signal (but not its noise) learns the signal.

- **Spatial redundancy** (SRDTrans): in every frame, every 2x2 cell gives an input pixel and
  its horizontal and vertical neighbours as two targets, all from the same frame, so the method
  does not depend on the frame rate. The network sees half-resolution training patches.
- **Temporal redundancy** (DeepCAD-style): even frames are the input, odd frames the target
  (or the other way round). The network must see ``patch_t`` frames, so a training patch reads
  ``2 * patch_t`` frames (see :func:`training_read_shape`).

The samplers work on torch tensors on the training device (random numbers from a
``torch.Generator`` on that device); :func:`dihedral` also takes numpy arrays, and
:func:`estimate_redundancy` works on numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from srdvol.errors import ConfigError, DataError, flag
from srdvol.model.symmetry import SYMMETRIES, dihedral, dihedral_inverse

__all__ = [
    "LOSSES",
    "SPATIAL_TRIPLES",
    "RedundancyEstimate",
    "dihedral",
    "dihedral_inverse",
    "estimate_redundancy",
    "pair_loss",
    "random_dihedral",
    "spatial_loss",
    "spatial_pairs",
    "temporal_pairs",
    "training_read_shape",
]

#: The 8 ordered triples (input, target a, target b) of a 2x2 cell whose pixels are numbered
#: 0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right. The targets are the input's
#: horizontal and vertical neighbours; the diagonal pixel is never used. Each input appears
#: with both target orders: the loss is symmetric in the two targets, so the order does not
#: change training, it only means target a is the horizontal neighbour half of the time.
SPATIAL_TRIPLES: tuple[tuple[int, int, int], ...] = (
    (0, 1, 2),
    (0, 2, 1),
    (1, 0, 3),
    (1, 3, 0),
    (2, 0, 3),
    (2, 3, 0),
    (3, 2, 1),
    (3, 1, 2),
)


def training_read_shape(
    patch: tuple[int, int, int], *, sampling: Literal["spatial", "temporal"]
) -> tuple[int, int, int]:
    """Shape ``(t, y, x)`` to read from the data for one training patch.

    Parameters
    ----------
    patch
        The model's patch ``(patch_t, y, x)`` (what inference feeds the network).
    sampling
        ``"spatial"``: read ``patch`` itself; the network trains on ``(patch_t, y/2, x/2)``
        (y and x must be even). ``"temporal"``: read ``(2 * patch_t, y, x)``; the network
        trains on ``(patch_t, y, x)``.

    Raises
    ------
    ConfigError
        If ``sampling`` is unknown or y or x is odd for spatial sampling.
    """
    t, y, x = patch
    if sampling == "spatial":
        if y % 2 or x % 2:
            raise ConfigError(
                flag("patch"),
                f"spatial sampling splits frames into 2x2 cells and patch y,x {y},{x} is odd",
                "choose even y and x",
            )
        return (t, y, x)
    if sampling == "temporal":
        return (2 * t, y, x)
    raise ConfigError(flag("sampling"), f"unknown sampling {sampling!r}", "use spatial or temporal")


def spatial_pairs(
    patches: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw an input and two targets from every 2x2 cell of every frame.

    Parameters
    ----------
    patches
        ``(..., Y, X)`` noisy data, e.g. ``(B, T, Y, X)`` or ``(B, 1, T, Y, X)``; Y and X even.
        Each cell of each leading index (every frame of every patch) gets its own draw.
    generator
        Random source on ``patches.device`` (``None``: torch's default).

    Returns
    -------
    inputs, target_a, target_b
        Each ``(..., Y/2, X/2)``: the chosen input pixel and its two orthogonal neighbours.

    Raises
    ------
    ConfigError
        If Y or X is odd.
    """
    *lead, height, width = patches.shape
    if height % 2 or width % 2:
        raise ConfigError(
            flag("patch"),
            f"spatial sampling needs even frame sizes and got {height}x{width}",
            "choose even patch y and x",
        )
    cells = patches.reshape(*lead, height // 2, 2, width // 2, 2).transpose(-3, -2)
    cells = cells.reshape(*lead, height // 2, width // 2, 4)  # pixel 2*dy + dx of each cell
    choice = torch.randint(
        0, len(SPATIAL_TRIPLES), cells.shape[:-1], generator=generator, device=patches.device
    )
    table = torch.tensor(SPATIAL_TRIPLES, device=patches.device)
    picks = table[choice]  # (..., Y/2, X/2, 3)
    gathered = torch.gather(cells, -1, picks)
    inputs, target_a, target_b = gathered.unbind(-1)
    return inputs, target_a, target_b


def temporal_pairs(
    patches: torch.Tensor, *, generator: torch.Generator | None = None, swap: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``2 * patch_t`` frames into interleaved input and target frames.

    Parameters
    ----------
    patches
        ``(B, ..., 2T, Y, X)`` noisy data; time is the third axis from the end.
    generator
        Random source on ``patches.device`` for the swap coin (``None``: torch's default).
    swap
        Per patch (first axis), swap input and target with probability 1/2, so the network
        sees both "predict the next frame" and "predict the previous frame".

    Returns
    -------
    inputs, targets
        Each ``(B, ..., T, Y, X)``; input frame ``i`` and target frame ``i`` are neighbours
        ``2i`` and ``2i + 1`` of the original (never the same frame).

    Raises
    ------
    ConfigError
        If the number of frames is odd.
    """
    frames = patches.shape[-3]
    if frames % 2 or frames < 2:
        raise ConfigError(
            flag("patch"),
            f"temporal sampling pairs even and odd frames and got {frames} frames",
            "read 2 * patch_t frames per training patch",
        )
    even = patches[..., 0::2, :, :]
    odd = patches[..., 1::2, :, :]
    if not swap:
        return even, odd
    coin = torch.rand(patches.shape[0], generator=generator, device=patches.device) < 0.5
    coin = coin.reshape(-1, *([1] * (patches.ndim - 1)))
    return torch.where(coin, odd, even), torch.where(coin, even, odd)


#: The losses :func:`pair_loss` knows (the values of :class:`srdvol.options.Loss`).
LOSSES = ("mse", "l1mse")


def pair_loss(prediction: torch.Tensor, target: torch.Tensor, *, kind: str = "mse") -> torch.Tensor:
    """The loss between a prediction and one noisy target (mean over pixels).

    ``kind="mse"``: the mean squared error, minimised by the conditional mean of the target,
    which is the clean signal for zero-mean noise. ``kind="l1mse"``: upstream SRDTrans's
    ``0.5 * L1 + 0.5 * MSE``; its L1 half is minimised by the conditional median, which lies
    below the mean for the skewed shot noise of dim pixels, so it flattens dim transients
    (benchmarks/RESULTS.md, issue 13).

    Raises
    ------
    ConfigError
        If ``kind`` is not one of :data:`LOSSES`.
    """
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "l1mse":
        return 0.5 * F.l1_loss(prediction, target) + 0.5 * F.mse_loss(prediction, target)
    raise ConfigError(flag("loss"), f"unknown loss {kind!r}", f"use one of {', '.join(LOSSES)}")


def spatial_loss(
    prediction: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor, *, kind: str = "mse"
) -> torch.Tensor:
    """Mean over the two spatial targets of :func:`pair_loss`."""
    return 0.5 * (
        pair_loss(prediction, target_a, kind=kind) + pair_loss(prediction, target_b, kind=kind)
    )


def random_dihedral(
    patches: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply an independent random symmetry to each patch (first axis) of ``(B, ..., Y, X)``.

    Square frames draw from all 8 transforms; non-square frames only from the 4 that keep
    the shape (identity, half turn, and the two mirrors), so the batch stays stackable.
    """
    square = patches.shape[-1] == patches.shape[-2]
    choices = torch.tensor(range(SYMMETRIES) if square else (0, 2, 4, 6))
    draws = torch.randint(
        0, len(choices), (patches.shape[0],), generator=generator, device=patches.device
    ).cpu()
    return torch.stack(
        [dihedral(patch, int(choices[d])) for patch, d in zip(patches, draws, strict=True)]
    )


@dataclass(frozen=True)
class RedundancyEstimate:
    """How much of the time-varying signal neighbouring pixels and neighbouring frames share.

    Attributes
    ----------
    spatial
        Lag-1 correlation between horizontally and vertically adjacent pixels (mean of both).
    temporal
        Lag-1 correlation between consecutive frames.
    choice
        The sampler to use: ``"spatial"`` or ``"temporal"``.
    reason
        One sentence for the user saying why.
    """

    spatial: float
    temporal: float
    choice: Literal["spatial", "temporal"]
    reason: str


#: Temporal sampling is chosen only when consecutive frames share clearly more than
#: neighbouring pixels (by this factor); otherwise spatial sampling, which works at any
#: frame rate, is the safer default.
TEMPORAL_MARGIN = 1.2


def estimate_redundancy(
    sample: np.ndarray | Sequence[np.ndarray], *, subject: str | None = None
) -> RedundancyEstimate:
    """Measure spatial and temporal redundancy of noisy movies and pick a sampler.

    Each movie's per-pixel temporal mean is removed first: the static image is shared by
    consecutive frames trivially, but what a denoiser must recover from its training
    partner is the changing signal (a calcium transient at 0.3 Hz is not in the next frame).
    On the residual, the covariance of adjacent pixels and of adjacent frames excludes the
    noise (independent between pixels and frames), while the variance includes it; both
    correlations are divided by the same variance, so noise shrinks both by the same factor
    and never changes the choice. (Removing the mean of ``T`` frames biases the temporal
    covariance by about ``-noise_variance / T``, which favours spatial sampling, the safe
    default, slightly for short movies.)

    Parameters
    ----------
    sample
        One ``(t, y, x)`` movie or several (e.g. crops from different places and planes);
        each needs t >= 3 and y, x >= 2. Any real dtype.
    subject
        What to name in error messages (the input path).

    Returns
    -------
    RedundancyEstimate

    Raises
    ------
    DataError
        If a movie is too small, contains NaN or Inf, or no movie is given.
    """
    movies = [sample] if isinstance(sample, np.ndarray) else list(sample)
    if not movies:
        raise DataError(subject, "no data to measure redundancy on", "pass at least one movie")
    sums = np.zeros(4)  # variance, horizontal, vertical, temporal covariance sums
    counts = np.zeros(4)
    for movie in movies:
        data = np.asarray(movie, dtype=np.float64)
        if data.ndim != 3 or data.shape[0] < 3 or min(data.shape[1:]) < 2:
            raise DataError(
                subject,
                f"a redundancy sample must be (t, y, x) with t >= 3 and y, x >= 2, got "
                f"shape {data.shape}",
                "sample larger crops",
            )
        if not np.isfinite(data).all():
            raise DataError(subject, "the data contain NaN or Inf", "clean the data first")
        residual = data - data.mean(axis=0)
        products = (
            residual * residual,
            residual[:, :, 1:] * residual[:, :, :-1],
            residual[:, 1:, :] * residual[:, :-1, :],
            residual[1:] * residual[:-1],
        )
        sums += [p.sum() for p in products]
        counts += [p.size for p in products]
    variance, horizontal, vertical, temporal_cov = sums / counts
    if variance <= 0:
        return RedundancyEstimate(
            0.0, 0.0, "spatial", "the sample does not change over time; using spatial sampling"
        )
    spatial = float(0.5 * (horizontal + vertical) / variance)
    temporal = float(temporal_cov / variance)
    if temporal > TEMPORAL_MARGIN * max(spatial, 0.0) and temporal > 0.02:
        choice: Literal["spatial", "temporal"] = "temporal"
        why = "consecutive frames share clearly more signal than neighbouring pixels"
    else:
        choice = "spatial"
        why = (
            "neighbouring pixels share at least as much signal as consecutive frames"
            if spatial >= temporal
            else "consecutive frames do not share clearly more signal than neighbouring pixels"
        )
    reason = (
        f"{why} (correlation of the changing signal: adjacent pixels {spatial:.2f}, "
        f"adjacent frames {temporal:.2f}); using {choice} sampling"
    )
    return RedundancyEstimate(spatial, temporal, choice, reason)
