"""Tests of srdvol.core.metrics against plain-numpy references written here, independently."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from srdvol.app.evaluate import evaluate_stores, format_metrics
from srdvol.core.metrics import evaluate, frame_ssim
from srdvol.errors import InputError
from srdvol.simulate import simulate

OFFSET = 100.0


def _movie(shape=(16, 3, 30, 34), seed=0):
    """A truth with structure and cells, a noisy estimate, and labels for one time point."""
    rng = np.random.default_rng(seed)
    t, *rest = shape
    yy, xx = np.mgrid[0 : rest[-2], 0 : rest[-1]]
    base = 50 * np.exp(-((yy - 12) ** 2 + (xx - 15) ** 2) / 40.0) + 0.5 * xx
    activity = rng.gamma(2.0, 1.0, size=(t, *rest[:-2], 1, 1))
    truth = OFFSET + base * activity + rng.normal(0, 2, size=shape)  # textured truth
    estimate = truth + rng.normal(0, 5, size=shape)
    labels = np.zeros(rest, np.int32)
    labels[..., 8:16, 10:20] = 1
    labels[..., 20:26, 2:9] = 2
    labels[..., 0:4, 28:34] = 7  # label ids need not be contiguous
    if len(rest) == 3:
        labels[1, 8:16, 10:20] = 3  # a different cell in another plane
    return estimate, truth, labels


# -------------------------------------------------------------- independent numpy references


def _ref_ssim_frame(x, y, data_range):
    """SSIM as luminance x contrast-structure terms, Gaussian window sigma 1.5, 11 px wide."""
    g = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    mu_x, mu_y = g(x), g(y)
    var_x, var_y = g(x**2) - mu_x**2, g(y**2) - mu_y**2
    cov = g(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    return (lum * cs)[5:-5, 5:-5].mean()


def _reference(estimate, truth, labels, offset):
    frames_e = estimate.reshape(-1, *estimate.shape[-2:])
    frames_g = truth.reshape(-1, *truth.shape[-2:])
    snr = [
        20 * np.log10(np.linalg.norm(g - offset) / np.linalg.norm(e - g))
        for e, g in zip(frames_e, frames_g, strict=True)
    ]
    rng_ = truth.max() - truth.min()
    mse = np.mean((estimate - truth) ** 2)
    ssim = [_ref_ssim_frame(e, g, rng_) for e, g in zip(frames_e, frames_g, strict=True)]
    rs = []
    for cell in np.unique(labels[labels > 0]):
        m = labels == cell
        te = np.array([frame[m].mean() for frame in estimate])
        tg = np.array([frame[m].mean() for frame in truth])
        rs.append(np.corrcoef(te, tg)[0, 1])
    return {
        "snr_db": np.mean(snr),
        "psnr_db": 10 * np.log10(rng_**2 / mse),
        "ssim": np.mean(ssim),
        "pearson_r": np.corrcoef(estimate.ravel(), truth.ravel())[0, 1],
        "trace_r": np.mean(rs),
        "n_cells": len(rs),
    }


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", [(16, 30, 34), (16, 3, 30, 34)])
def test_evaluate_matches_numpy_on_oddly_chunked_dask_arrays(shape):
    estimate, truth, labels = _movie(shape)
    ref = _reference(estimate, truth, labels, OFFSET)
    chunks = (5, *([2] if len(shape) == 4 else []), 7, 11)
    with dask.config.set({"array.chunk-size": "32KiB"}):  # many blocks in every reduction
        got = evaluate(
            da.from_array(estimate, chunks=chunks),
            da.from_array(truth, chunks=4),  # unaligned
            masks=labels,
            offset=OFFSET,
        )
    for key in ("snr_db", "psnr_db", "ssim", "pearson_r", "trace_r"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert got["n_cells"] == ref["n_cells"] == (4 if len(shape) == 4 else 3)
    assert got["frames"] == int(np.prod(shape[:-2]))


def test_ssim_agrees_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    _, truth, _ = _movie((1, 40, 44))
    est = truth + np.random.default_rng(1).normal(0, 8, truth.shape)
    rng_ = float(truth.max() - truth.min())
    ours = frame_ssim(est[0], truth[0], data_range=rng_)
    theirs = metrics.structural_similarity(
        est[0],
        truth[0],
        data_range=rng_,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert 0.0 < ours < 1.0


def test_offset_is_kept_out_of_the_snr():
    estimate, truth, _ = _movie((16, 20, 20))
    raw = evaluate(estimate, truth)["snr_db"]
    fair = evaluate(estimate, truth, offset=OFFSET)["snr_db"]
    assert raw > fair + 3  # the constant baseline inflates the raw ratio
    shifted = evaluate(estimate + 1000, truth + 1000, offset=OFFSET + 1000)["snr_db"]
    assert shifted == pytest.approx(fair, rel=1e-9)


def test_perfect_estimate_scores_perfectly_and_worse_estimates_score_lower():
    estimate, truth, labels = _movie((16, 24, 24))
    perfect = evaluate(truth, truth, masks=labels, offset=OFFSET)
    assert perfect["snr_db"] == np.inf and perfect["psnr_db"] == np.inf
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["pearson_r"] == pytest.approx(1.0)
    assert perfect["trace_r"] == pytest.approx(1.0)
    good = evaluate(estimate, truth, masks=labels, offset=OFFSET)
    noise = estimate - truth
    bad = evaluate(truth + 3 * noise, truth, masks=labels, offset=OFFSET)
    for key in ("snr_db", "psnr_db", "ssim", "pearson_r"):
        assert good[key] > bad[key], key
    assert good["snr_db"] - bad["snr_db"] == pytest.approx(20 * np.log10(3), rel=1e-9)


def test_dataarrays_are_put_in_time_first_y_x_last_order():
    estimate, truth, labels = _movie((16, 2, 20, 22))
    dims = ("t", "z", "y", "x")
    e = xr.DataArray(estimate, dims=dims).transpose("y", "t", "x", "z")
    g = xr.DataArray(truth, dims=dims)
    got = evaluate(e, g, masks=labels, offset=OFFSET)
    ref = _reference(estimate, truth, labels, OFFSET)
    assert got["ssim"] == pytest.approx(ref["ssim"], rel=1e-9)
    assert got["trace_r"] == pytest.approx(ref["trace_r"], rel=1e-9)


def test_shape_mismatch_names_both_images():
    a = xr.DataArray(np.zeros((16, 8, 8)), dims=("t", "y", "x"), attrs={"source": "out.zarr"})
    b = xr.DataArray(np.ones((16, 8, 9)), dims=("t", "y", "x"), attrs={"source": "truth.zarr"})
    with pytest.raises(InputError, match=r"out\.zarr vs truth\.zarr: shapes differ"):
        evaluate(a, b)


def test_masks_that_do_not_fit_are_refused():
    estimate, truth, _ = _movie((16, 20, 20))
    with pytest.raises(InputError, match="masks"):
        evaluate(estimate, truth, masks=np.zeros((20, 21), np.int32))
    with pytest.raises(InputError, match="masks"):
        evaluate(estimate, truth, masks=np.zeros((20, 20), np.float32))


def test_evaluate_stores_reads_offset_and_labels_from_the_simulated_truth(tmp_path):
    info = simulate(tmp_path / "noisy", truth=tmp_path / "truth", frames=16, size=(40, 40))
    result = evaluate_stores(tmp_path / "noisy", truth=tmp_path / "truth", noisy=tmp_path / "noisy")
    assert result["offset"] == info.offset
    from srdvol.ngff.labels import read_masks

    labels = read_masks(tmp_path / "truth")
    assert labels is not None and labels.shape == (40, 40)
    import zarr

    noisy = zarr.open_array(os.fspath(tmp_path / "noisy/s0"))[...].astype(np.float64)
    truth = zarr.open_array(os.fspath(tmp_path / "truth/s0"))[...].astype(np.float64)
    ref = _reference(noisy, truth, labels, info.offset)
    for key in ("snr_db", "psnr_db", "ssim", "pearson_r", "trace_r"):
        assert result["estimate"][key] == pytest.approx(ref[key], rel=1e-6), key
    assert result["noisy"] == result["estimate"]
    assert 0.0 < result["estimate"]["snr_db"] < 8.0  # the default photon budget is low-SNR
    perfect = evaluate_stores(tmp_path / "truth", truth=tmp_path / "truth")
    assert perfect["estimate"]["ssim"] == pytest.approx(1.0)
    text = format_metrics(result)
    assert "snr_db" in text and "noisy" in text and "estimate" in text


def test_evaluate_stores_refuses_a_store_of_another_shape(tmp_path):
    simulate(tmp_path / "a", truth=tmp_path / "ta", frames=16, size=(24, 24))
    simulate(tmp_path / "b", truth=tmp_path / "tb", frames=16, size=(24, 26))
    with pytest.raises(InputError, match=r"vs .*ta"):
        evaluate_stores(tmp_path / "b", truth=tmp_path / "ta")
