"""Tests of srdvol.core.normalize: global statistics from a deterministic chunk sample."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from srdvol.core.normalize import (
    Statistics,
    _choose_chunks,
    denormalize,
    normalize,
    sample_statistics,
)
from srdvol.errors import ConfigError, DataError


def zarr_image(path: Path, data: np.ndarray, chunks: tuple[int, ...], dims: str) -> xr.DataArray:
    """Write ``data`` to a real zarr store and open it as srdvol does (lazy, read-only)."""
    arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype)
    arr[...] = data
    ro = zarr.open_array(str(path), mode="r")
    return xr.DataArray(da.from_zarr(ro), dims=tuple(dims), attrs={"source": str(path)})


def test_full_sample_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.poisson(50.0, size=(20, 3, 12, 10)).astype(np.uint16)
    image = zarr_image(tmp_path / "a.zarr", data, (7, 1, 5, 4), "tzyx")
    stats = sample_statistics(image, max_bytes=10**9)
    assert stats.count == data.size
    assert stats.chunks == 3 * 3 * 3 * 3
    assert stats.mean == pytest.approx(data.mean(dtype=np.float64), rel=1e-12)
    assert stats.std == pytest.approx(data.std(dtype=np.float64), rel=1e-12)


def test_small_budget_reads_a_deterministic_subset(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(100.0, 10.0, size=(64, 4, 16, 16)).astype(np.float32)
    image = zarr_image(tmp_path / "b.zarr", data, (8, 1, 8, 8), "tzyx")
    budget = 6 * 8 * 8 * 8 * 8  # six chunks of float64
    first = sample_statistics(image, max_bytes=budget, seed=3)
    again = sample_statistics(image, max_bytes=budget, seed=3)
    other = sample_statistics(image, max_bytes=budget, seed=4)
    assert first == again
    assert first.chunks == 6
    assert first.count == 6 * 8 * 8 * 8
    assert first != other
    # A sample of Gaussian data still estimates the global figures well.
    assert first.mean == pytest.approx(100.0, abs=1.0)
    assert first.std == pytest.approx(10.0, rel=0.1)


def test_chunk_choice_spreads_over_time_and_planes() -> None:
    dims = ["t", "c", "z", "y", "x"]
    chosen = _choose_chunks([40, 2, 5, 3, 3], dims, 10, seed=0)
    assert len(chosen) == 10
    t_rows = sorted(index[0] for index in chosen)
    assert t_rows == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    planes = {(index[1], index[2]) for index in chosen}
    assert len(planes) == 10  # every pick a different (c, z) plane while planes remain


def test_chunk_choice_covers_everything_when_asked() -> None:
    chosen = _choose_chunks([3, 2, 2], ["t", "y", "x"], 12, seed=5)
    assert len(chosen) == 12
    assert len(set(chosen)) == 12


def test_huge_chunk_is_cut_along_t(tmp_path: Path) -> None:
    data = np.arange(32 * 8 * 8, dtype=np.float32).reshape(32, 8, 8)
    image = zarr_image(tmp_path / "c.zarr", data, (32, 8, 8), "tyx")
    stats = sample_statistics(image, max_bytes=4 * 8 * 8 * 8)
    assert stats.chunks == 1
    assert stats.count == 4 * 8 * 8
    assert stats.mean == pytest.approx(data[:4].mean())


def test_nan_names_store_and_chunk(tmp_path: Path) -> None:
    data = np.ones((16, 8, 8), dtype=np.float32)
    data[::2] = 2.0
    data[9, 5, 6] = np.nan
    path = tmp_path / "nan.zarr"
    image = zarr_image(path, data, (8, 4, 4), "tyx")
    with pytest.raises(DataError) as info:
        sample_statistics(image, max_bytes=10**9)
    message = str(info.value)
    assert str(path) in message
    assert "t=8:16, y=4:8, x=4:8" in message
    assert "NaN or Inf" in message


def test_inf_is_caught_too(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(16, 4, 4))
    data[0, 0, 0] = np.inf
    image = zarr_image(tmp_path / "inf.zarr", data, (16, 4, 4), "tyx")
    with pytest.raises(DataError, match="NaN or Inf"):
        sample_statistics(image)


def test_constant_image_is_an_error(tmp_path: Path) -> None:
    image = zarr_image(tmp_path / "k.zarr", np.full((16, 4, 4), 7, np.uint8), (4, 4, 4), "tyx")
    with pytest.raises(DataError, match="constant"):
        sample_statistics(image)


def test_bad_budget_is_a_config_error(tmp_path: Path) -> None:
    image = zarr_image(tmp_path / "z.zarr", np.zeros((16, 4, 4), np.uint8), (4, 4, 4), "tyx")
    with pytest.raises(ConfigError):
        sample_statistics(image, max_bytes=0)


def test_numpy_backed_array_uses_store_chunks() -> None:
    data = np.random.default_rng(3).normal(5.0, 2.0, size=(16, 6, 6))
    image = xr.DataArray(data, dims=("t", "y", "x"), attrs={"store_chunks": {"t": 4}})
    stats = sample_statistics(image)
    assert stats.chunks == 4
    assert stats.mean == pytest.approx(data.mean())
    assert stats.std == pytest.approx(data.std())


def test_normalize_round_trip_and_scale() -> None:
    stats = Statistics(mean=100.0, std=4.0)
    x = np.array([96.0, 100.0, 108.0])
    z = normalize(x, stats)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, [-1.0, 0.0, 2.0])
    np.testing.assert_allclose(denormalize(z, stats), x)
    assert Statistics.from_dict(stats.to_dict()) == stats


def test_compare_statistics_warns_only_when_far_from_the_training_data():
    from srdvol.core.normalize import compare_statistics

    trained = Statistics(mean=100.0, std=10.0)
    for near in (Statistics(109.0, 10.0), Statistics(91.0, 6.0), Statistics(100.0, 19.0)):
        assert compare_statistics(near, trained) is None
    shifted = compare_statistics(Statistics(73.0, 10.0), trained, subject="in.zarr")
    assert shifted.startswith("in.zarr: the input's intensities (mean 73, std 10) are far")
    assert "(mean 100, std 10: -2.7 training std apart, 1x the spread)" in shifted
    assert "retrain on this data" in shifted
    assert compare_statistics(Statistics(100.0, 25.0), trained) is not None  # 2.5x the spread
    assert compare_statistics(Statistics(100.0, 4.0), trained) is not None  # 0.4x
