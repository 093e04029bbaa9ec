"""Tests for srdvol.core.frames: frames spread over a recording, read from few storage chunks."""

from __future__ import annotations

import numpy as np
import pytest

from srdvol.core.frames import frames_of_few_chunks


def test_without_chunks_the_frames_are_evenly_spaced():
    got = frames_of_few_chunks(1000, 256)
    assert got.tolist() == np.unique(np.linspace(0, 999, 256).round()).astype(int).tolist()
    assert frames_of_few_chunks(5, 256).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("chunks", "count", "at_least", "taken"),
    [
        ([8] * 128, 256, 8, 32),  # 32 chunks of 8 hold 256 frames
        ([64] * 16, 256, 8, 8),  # 4 would hold them; at least 8, spread
        ([64] * 16, 256, 2, 4),
        ([100] * 3, 256, 8, 3),  # fewer chunks than asked for: all
        ([10] * 9 + [4], 32, 2, 4),  # a short last chunk
    ],
)
def test_whole_chunks_spread_from_the_first_to_the_last(chunks, count, at_least, taken):
    frames = sum(chunks)
    got = frames_of_few_chunks(frames, count, chunks, at_least=at_least)
    starts = np.cumsum([0, *chunks])
    chunk_of = np.searchsorted(starts, got, side="right") - 1
    read = np.unique(chunk_of)
    assert len(read) == taken
    # every frame of a chunk read, none of a chunk not read
    assert len(got) == sum(chunks[i] for i in read)
    assert len(got) >= min(count, frames)
    assert read[0] == 0 and read[-1] == len(chunks) - 1
    gaps = np.diff(read)
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_chunks_that_do_not_make_up_the_recording_are_refused():
    with pytest.raises(ValueError, match="do not sum to 100"):
        frames_of_few_chunks(100, 32, [30, 30, 30])
