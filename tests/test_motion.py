"""Tests for srdvol.predict.motion and the warning of a guided run on a moving recording."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from srdvol.app.checks import check_still
from srdvol.ngff.read import open_image
from srdvol.predict.motion import (
    MOVING_SHARE,
    SAMPLED_FRAMES,
    frame_shifts,
    plane_frames,
    sampled_frames,
)
from srdvol.simulate import simulate

#: The field of view moves inside a larger simulated one: frames of 64x64 cut from 72x72.
MARGIN, SIZE = 4, 64


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> np.ndarray:
    """A simulated recording at 4 photons per pixel, 32 frames of 72x72."""
    path = tmp_path_factory.mktemp("motion") / "in.zarr"
    size = (SIZE + 2 * MARGIN,) * 2
    simulate(path, truth=path.parent / "truth.zarr", frames=32, size=size, seed=0, photons=4.0)
    return np.asarray(open_image(path).data, dtype=np.float32)


def _cut(field: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each frame's view of the field moved by ``offsets[i] = (dy, dx)`` (content moves by
    +dy rows, +dx columns)."""
    views = [
        f[MARGIN - dy : MARGIN - dy + SIZE, MARGIN - dx : MARGIN - dx + SIZE]
        for f, (dy, dx) in zip(field, offsets, strict=True)
    ]
    return np.stack(views)


@pytest.fixture(scope="module")
def movie(field) -> np.ndarray:
    return _cut(field, np.zeros((len(field), 2), dtype=np.int64))


def test_a_still_recording_has_no_shifted_frame(movie):
    motion = frame_shifts(movie)
    assert motion.shifts.shape == (32, 2)
    assert motion.shifted == 0 and motion.largest == 0 and not motion.moving


def test_shifted_frames_are_found_with_their_direction(field):
    rng = np.random.default_rng(0)
    moved = rng.choice(len(field), size=int(MOVING_SHARE * len(field)), replace=False)
    offsets = np.zeros((len(field), 2), dtype=np.int64)
    offsets[moved] = rng.choice([-3, -2, -1, 1, 2, 3], size=(len(moved), 2))
    motion = frame_shifts(_cut(field, offsets))
    assert motion.moving and motion.shifted == len(moved)
    np.testing.assert_array_equal(motion.shifts[offsets == 0], 0)
    np.testing.assert_array_equal(np.sign(motion.shifts), np.sign(offsets))
    # whole-pixel estimates: within one pixel of the true shift
    assert np.abs(motion.shifts - offsets).max() <= 1
    # one shifted frame fewer than the share is not motion
    offsets[moved[0]] = 0
    assert not frame_shifts(_cut(field, offsets)).moving


def test_the_check_reads_sampled_frames_of_the_middle_plane_and_first_channel():
    t, c, z = 100, 2, 5
    values = np.arange(t * c * z, dtype=np.float32).reshape(t, c, z, 1, 1)
    image = xr.DataArray(np.broadcast_to(values, (t, c, z, 4, 6)), dims=("t", "c", "z", "y", "x"))
    frames = np.asarray(plane_frames(image))
    picked = sampled_frames(t)
    assert len(picked) == SAMPLED_FRAMES and picked[0] == 0 and picked[-1] == t - 1
    assert frames.shape == (SAMPLED_FRAMES, 4, 6)
    np.testing.assert_array_equal(frames[:, 0, 0], values[picked, 0, z // 2, 0, 0])
    assert np.array_equal(sampled_frames(10), np.arange(10))
    # stored in chunks of 8 frames: 32 frames from 5 of the 13 chunks, the first and the last
    chunked = image.chunk({"t": 8})
    picked = sampled_frames(t, chunked.chunksizes["t"])
    assert len(picked) == SAMPLED_FRAMES and picked[0] == 0 and picked[-1] == t - 1
    assert len(set(picked // 8)) == 5
    frames = np.asarray(plane_frames(chunked))
    np.testing.assert_array_equal(frames[:, 0, 0], values[picked, 0, z // 2, 0, 0])


def test_check_still_warns_only_on_a_moving_input(field, movie, capsys):
    still = xr.DataArray(movie, dims=("t", "y", "x"))
    check_still("in.zarr", still)
    assert capsys.readouterr().err == ""
    jitter = np.random.default_rng(1).integers(-2, 3, size=(len(movie), 2))
    moving = _cut(field, jitter)
    check_still("in.zarr", xr.DataArray(moving, dims=("t", "y", "x")))
    err = capsys.readouterr().err
    assert err.startswith("srdvol: warning: in.zarr seems to move:"), err
    assert "--guide assumes a still recording" in err and "register it first" in err
    assert err.count("\n") == 1
    # --restore learns each tile's patterns over hundreds of frames: it names itself
    from srdvol.options import PredictOptions

    check_still("in.zarr", xr.DataArray(moving, dims=("t", "y", "x")), PredictOptions(restore=4))
    err = capsys.readouterr().err
    assert "--restore assumes a still recording" in err and "without --restore" in err


def test_a_guided_prediction_of_a_moving_input_warns_and_still_runs(
    field, tiny_model, make_image, tmp_path, monkeypatch, capsys
):
    from srdvol.app.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    jitter = np.random.default_rng(2).integers(-2, 3, size=(len(field), 2))
    source, _ = make_image(data=_cut(field, jitter).astype(np.uint16), axes="tyx")
    common = ["--model", str(tiny_model), "--workers", "1", "--dashboard-address", ":0"]
    try:
        main(["predict", source, str(tmp_path / "out.zarr"), *common, "--guide", "2"])
    except SystemExit as exc:
        assert not exc.code, exc.code
    err = capsys.readouterr().err
    assert err.count(f"srdvol: warning: {source} seems to move:") == 1, err
    assert (tmp_path / "out.zarr" / "s0").is_dir()
