"""Does the recording move? The check behind ``--guide``'s warning.

``--guide`` filters each frame with the recording's mean image, which shows where the
structures of every frame are only when the recording is still (or registered). On a moving
recording it costs SNR instead of giving it (benchmarks/RESULTS.md: frames shifted by up to
2 px lose 0.5 dB against the unguided output). Before a guided run, srdvol samples
:data:`SAMPLED_FRAMES` frames evenly over the recording (one plane, one channel) and finds
each one's whole-pixel shift against the mean of the others by cross-correlation; when at
least :data:`MOVING_SHARE` of them are shifted, the run warns.

The estimate integrates over the whole frame, so it works at a few photons per pixel; a frame
counts as shifted when its correlation peaks at least one pixel away from zero and beats the
correlation at zero by :data:`Z_MIN` standard deviations of the frame's noise (so noise alone
does not count, and sub-pixel residuals of a registration pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from srdvol.core.frames import frames_of_few_chunks

__all__ = [
    "MOVING_SHARE",
    "SAMPLED_FRAMES",
    "Motion",
    "frame_shifts",
    "plane_frames",
    "sampled_frames",
]

#: Frames the check reads (evenly spaced over the recording).
SAMPLED_FRAMES = 32

#: The share of sampled frames that must be shifted for the recording to count as moving
#: (a few frames' peaks may land one pixel off in very dim data; motion moves most frames).
MOVING_SHARE = 0.25

#: The largest shift searched, in pixels along y and x.
MAX_SHIFT = 8

#: A frame counts as shifted when its correlation with the others' mean peaks away from zero
#: by at least this many standard deviations of the frame's noise (tiny or very dim frames,
#: whose peaks wander with the noise, count as still).
Z_MIN = 5.0


@dataclass(frozen=True)
class Motion:
    """Whole-pixel shifts ``(dy, dx)`` of the sampled frames against the others' mean."""

    shifts: np.ndarray

    @property
    def shifted(self) -> int:
        """How many sampled frames are shifted by at least one pixel."""
        return int((np.abs(self.shifts).max(axis=1) >= 1).sum())

    @property
    def largest(self) -> int:
        """The largest shift along y or x, in pixels."""
        return int(np.abs(self.shifts).max()) if len(self.shifts) else 0

    @property
    def moving(self) -> bool:
        """Whether at least :data:`MOVING_SHARE` of the sampled frames are shifted."""
        return len(self.shifts) > 1 and self.shifted >= MOVING_SHARE * len(self.shifts)


def sampled_frames(frames: int, chunks: Sequence[int] | None = None) -> np.ndarray:
    """Indices of the frames the check reads: all, or :data:`SAMPLED_FRAMES` evenly spaced.

    With the storage's chunk lengths along t (``chunks``), the frames come from as few chunks
    as hold :data:`SAMPLED_FRAMES` frames (at least two: the first and the last, so a drift
    shows), evenly spaced over the recording, and evenly from those chunks' frames: a chunk
    of 64 frames is not read for one frame.
    """
    available = frames_of_few_chunks(frames, SAMPLED_FRAMES, chunks, at_least=2)
    count = min(len(available), SAMPLED_FRAMES)
    return available[np.unique(np.linspace(0, len(available) - 1, count).round().astype(int))]


def frame_shifts(frames: np.ndarray) -> Motion:
    """Each frame's whole-pixel shift against the mean of the other frames.

    Parameters
    ----------
    frames
        ``(n, y, x)`` array of one plane's frames, any real dtype.

    Returns
    -------
    Motion
        ``shifts[i]`` is ``(dy, dx)`` such that ``frames[i]`` looks like the others' mean
        moved by ``dy`` rows and ``dx`` columns (at most :data:`MAX_SHIFT`, and less than half
        the frame).
    """
    stack = np.asarray(frames, dtype=np.float64)
    n, height, width = stack.shape
    # A Hann taper: the frames' edges would otherwise correlate best at zero shift.
    taper = np.outer(np.hanning(height), np.hanning(width))
    total = stack.sum(axis=0)
    reach_y, reach_x = min(MAX_SHIFT, (height - 1) // 2), min(MAX_SHIFT, (width - 1) // 2)
    dy = np.r_[0 : reach_y + 1, -reach_y:0]
    dx = np.r_[0 : reach_x + 1, -reach_x:0]
    # Shot noise is white and the structures are not: a Gaussian low-pass (sigma 1 px) of the
    # frames keeps the correlation peak where it is and lowers the noise around it.
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    low_pass = np.exp(-2 * np.pi**2 * (fy**2 + fx**2))
    shifts = np.zeros((n, 2), dtype=np.int64)
    for i, frame in enumerate(stack):
        others = (total - frame) / max(n - 1, 1)
        a = np.fft.rfft2((frame - frame.mean()) * taper)
        b = np.fft.rfft2((others - others.mean()) * taper)
        correlation = np.fft.irfft2(a * np.conj(b) * low_pass, s=(height, width))
        window = correlation[np.ix_(dy % height, dx % width)]
        row, col = np.unravel_index(int(np.argmax(window)), window.shape)
        shift = dy[row], dx[col]
        if (
            shift != (0, 0)
            and _significance(frame, taper, b * low_pass, correlation, shift) >= Z_MIN
        ):
            shifts[i] = shift
    return Motion(shifts)


def _significance(
    frame: np.ndarray, taper: np.ndarray, reference: np.ndarray, correlation: np.ndarray, shift: Any
) -> float:
    """How many standard deviations of the frame's noise the correlation at ``shift`` beats the
    correlation at zero by (``reference``: the low-passed, tapered reference's spectrum).

    The correlation at ``s`` is ``sum_x taper(x) frame(x) q(x - s)``, ``q`` the reference; white
    noise of variance ``v`` in the frame adds to ``c(s) - c(0)`` a term of variance
    ``v sum_x taper(x)^2 (q(x - s) - q(x))^2``. ``v`` is estimated from differences of
    neighbouring pixels, which count the frame's fine structure as noise too (the test errs
    towards "still").
    """
    q = np.fft.irfft2(reference, s=frame.shape)
    spread = np.sum((taper * (np.roll(q, shift, axis=(0, 1)) - q)) ** 2)
    noise = 0.5 * np.var(np.diff(frame, axis=1))
    gain = correlation[shift] - correlation[0, 0]
    return float(gain / np.sqrt(max(noise * spread, 1e-300)))


def plane_frames(image: Any) -> Any:
    """The frames the check reads from a labelled image (``t`` and ``y``, ``x`` among its
    dims): :func:`sampled_frames` (of its storage chunks, for a dask-backed image) of its middle
    ``z`` plane and first channel, lazily, as a ``(n, y, x)`` array."""
    picks = {dim: image.sizes[dim] // 2 if dim == "z" else 0 for dim in image.dims}
    chunks = image.chunksizes.get("t") if image.chunks else None
    picks |= {"t": sampled_frames(image.sizes["t"], chunks)}
    del picks["y"], picks["x"]
    return image.isel(picks).transpose("t", "y", "x").data
