"""Which frames to read when a check or a statistic needs only some of a recording's.

Storage is read whole chunks at a time: one frame of a chunk of 64 frames costs the whole chunk.
So a sample of frames spread over a recording is taken from as few storage chunks as hold it,
spread evenly over the recording, rather than from evenly spaced frames that would touch every
chunk (the mean image of ``--guide``, the motion check before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["frames_of_few_chunks"]


def frames_of_few_chunks(
    frames: int, count: int, chunks: Sequence[int] | None = None, *, at_least: int = 1
) -> np.ndarray:
    """Every frame of the fewest storage chunks that hold ``count`` frames.

    Parameters
    ----------
    frames
        Length of the recording.
    count
        How many frames are wanted.
    chunks
        The storage's chunk lengths along t, summing to ``frames`` (``None``: one frame per
        chunk, so the result is ``count`` evenly spaced frames).
    at_least
        The fewest chunks to take (or all), evenly spaced; with 2 or more the first and the
        last chunk are among them, so a change over the recording shows.

    Returns
    -------
    numpy.ndarray
        Sorted frame indices: all frames of the chunks taken.
    """
    lengths = [int(n) for n in chunks] if chunks else [1] * int(frames)
    bounds = np.cumsum([0, *lengths])
    if bounds[-1] != frames:
        raise ValueError(f"chunks {tuple(lengths)} do not sum to {frames} frames")
    # chunks of the recording's mean length that hold `count` frames
    wanted = max(at_least, -(-int(count) * len(lengths) // int(frames)))
    taken = np.unique(np.linspace(0, len(lengths) - 1, min(len(lengths), wanted)).round())
    return np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in taken.astype(int)])
