"""Tests of srdvol.core.traces: trace correlation and transient gain against numpy references
and against traces built with a known answer."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from srdvol.core.traces import check_masks, fit_traces, pixel_fit, pixel_sums
from srdvol.errors import InputError


def _orthogonal_pair(t: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (t, n) arrays whose columns are centred, of norm 1, and orthogonal column by column."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(t, n))
    b = rng.normal(size=(t, n))
    a -= a.mean(axis=0)
    b -= b.mean(axis=0)
    b -= a * (a * b).sum(axis=0) / (a * a).sum(axis=0)
    return a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=0)


def test_a_flattened_copy_has_gain_one_half_and_correlation_one():
    truth = 100 + 40 * np.random.default_rng(1).gamma(2.0, 1.0, size=(64, 5))
    estimate = 0.5 * (truth - 100) + 117.0  # other baseline, half the amplitude
    r, gain = fit_traces(estimate, truth)
    np.testing.assert_allclose(gain, 0.5, rtol=1e-12)
    np.testing.assert_allclose(r, 1.0, rtol=1e-12)


@pytest.mark.parametrize(("target_r", "target_gain"), [(0.5, 0.5), (0.8, 1.0), (0.3, 2.0)])
def test_a_known_correlation_and_gain_come_out(target_r, target_gain):
    # estimate = gain * truth + noise orthogonal to the truth, scaled so that
    # r = gain |g| / sqrt(gain² |g|² + |n|²) is the target.
    g, n = _orthogonal_pair(50, 4)
    noise = target_gain * np.sqrt(1 / target_r**2 - 1)
    truth = 10 + 3 * g
    estimate = 5 + target_gain * 3 * g + 3 * noise * n
    r, gain = fit_traces(estimate, truth)
    np.testing.assert_allclose(r, target_r, rtol=1e-10)
    np.testing.assert_allclose(gain, target_gain, rtol=1e-10)


def test_fit_traces_matches_corrcoef_and_polyfit():
    rng = np.random.default_rng(2)
    truth = rng.gamma(2.0, 1.0, size=(40, 6))
    estimate = 0.7 * truth + rng.normal(0, 0.5, size=truth.shape)
    r, gain = fit_traces(estimate, truth)
    for j in range(truth.shape[1]):
        assert r[j] == pytest.approx(np.corrcoef(estimate[:, j], truth[:, j])[0, 1], rel=1e-12)
        assert gain[j] == pytest.approx(np.polyfit(truth[:, j], estimate[:, j], 1)[0], rel=1e-10)


def test_a_constant_truth_has_no_correlation_or_gain():
    truth = np.ones((10, 2))
    truth[:, 1] = np.arange(10)
    r, gain = fit_traces(np.arange(20.0).reshape(10, 2), truth)
    assert np.isnan(r[0]) and np.isnan(gain[0])
    assert r[1] == pytest.approx(1.0) and gain[1] == pytest.approx(2.0)


@pytest.mark.parametrize("chunks", [(3, 2, 5, 4), (7, 1, 9, 9), (-1, -1, -1, -1)])
def test_pixel_fit_of_lazy_sums_matches_each_pixels_numpy_fit(chunks):
    rng = np.random.default_rng(3)
    shape = (23, 2, 9, 11)
    truth = 50 + 20 * rng.gamma(2.0, 1.0, size=shape)
    estimate = 0.6 * truth + rng.normal(0, 4, size=shape) + 3
    e = da.from_array(estimate, chunks=chunks)
    g = da.from_array(truth, chunks=chunks)
    r, gain = pixel_fit(pixel_sums(e - 40.0, g - 40.0), shape[0])
    r, gain = r.compute(), gain.compute()
    flat_e = estimate.reshape(shape[0], -1)
    flat_g = truth.reshape(shape[0], -1)
    ref_r, ref_gain = fit_traces(flat_e, flat_g)
    np.testing.assert_allclose(r.ravel(), ref_r, rtol=1e-9)
    np.testing.assert_allclose(gain.ravel(), ref_gain, rtol=1e-9)
    assert 0.4 < np.median(gain) < 0.8  # the noise does not bias the gain


def test_pixel_fit_gives_nan_where_the_truth_pixel_is_constant():
    truth = np.zeros((8, 1, 2))
    truth[:, 0, 1] = np.arange(8)
    truth[:, 0, 0] = 3.0
    sums = pixel_sums(da.from_array(truth * 2.0), da.from_array(truth))
    r, gain = (v.compute() for v in pixel_fit(sums, 8))
    assert np.isnan(r[0, 0]) and np.isnan(gain[0, 0])
    assert gain[0, 1] == pytest.approx(2.0) and r[0, 1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "masks",
    [np.zeros((4, 4), np.int32), np.zeros((3, 5), np.float32), np.zeros((5,), np.int64)],
)
def test_masks_of_another_shape_or_dtype_are_refused(masks):
    with pytest.raises(InputError, match="masks"):
        check_masks(masks, (10, 3, 5))
