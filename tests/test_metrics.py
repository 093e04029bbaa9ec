"""Tests of srdvol.core.metrics against plain-numpy references written here, independently."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from srdvol.app.evaluate import DEFAULT_SIGMAS, evaluate_stores, format_metrics, parse_sigmas
from srdvol.core.metrics import evaluate, frame_ssim, gaussian_frames
from srdvol.errors import ConfigError, InputError
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
    rs, gains = [], []
    for cell in np.unique(labels[labels > 0]):
        m = labels == cell
        te = np.array([frame[m].mean() for frame in estimate])
        tg = np.array([frame[m].mean() for frame in truth])
        rs.append(np.corrcoef(te, tg)[0, 1])
        gains.append(np.polyfit(tg, te, 1)[0])
    pixel_rs, pixel_gains = [], []
    for index in zip(*np.nonzero(labels > 0), strict=True):
        pe, pg = estimate[(slice(None), *index)], truth[(slice(None), *index)]
        pixel_rs.append(np.corrcoef(pe, pg)[0, 1])
        pixel_gains.append(np.polyfit(pg, pe, 1)[0])
    return {
        "trace_gain": np.median(gains),
        "pixel_r": np.mean(pixel_rs),
        "pixel_gain": np.median(pixel_gains),
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
    keys = ("snr_db", "psnr_db", "ssim", "pearson_r", "trace_r", "trace_gain", "pixel_r")
    for key in (*keys, "pixel_gain"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert got["n_pixels"] == int((labels > 0).sum())
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


def test_a_movie_with_halved_transients_has_gain_one_half_in_cells_and_pixels():
    _, truth, labels = _movie((24, 2, 20, 22))
    resting = truth.min(axis=0)  # each pixel keeps its own baseline, its changes are halved
    estimate = resting + 0.5 * (truth - resting) + 4.0
    got = evaluate(estimate, truth, masks=labels, offset=OFFSET)
    assert got["trace_gain"] == pytest.approx(0.5, rel=1e-9)
    assert got["pixel_gain"] == pytest.approx(0.5, rel=1e-9)
    assert got["trace_r"] == pytest.approx(1.0, rel=1e-9)
    assert got["pixel_r"] == pytest.approx(1.0, rel=1e-9)
    assert got["snr_db"] < evaluate(truth + 4.0, truth, offset=OFFSET)["snr_db"]


def test_a_known_pixel_correlation_comes_out():
    # Every pixel of the estimate = the truth + noise orthogonal to that pixel's centred truth
    # and of the same norm: correlation 1/sqrt(2) and gain 1 in every labelled pixel.
    rng = np.random.default_rng(5)
    _, truth, labels = _movie((32, 18, 20))
    flat = truth.reshape(32, -1)
    g = flat - flat.mean(axis=0)
    n = rng.normal(size=g.shape)
    n -= n.mean(axis=0)
    n -= g * (g * n).sum(axis=0) / (g * g).sum(axis=0)
    n *= np.linalg.norm(g, axis=0) / np.linalg.norm(n, axis=0)
    estimate = (flat + n).reshape(truth.shape)
    got = evaluate(da.from_array(estimate, chunks=(5, 7, 6)), truth, masks=labels)
    assert got["pixel_r"] == pytest.approx(1 / np.sqrt(2), rel=1e-9)
    assert got["pixel_gain"] == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.0, 0.8, 2.0])
def test_gaussian_frames_filters_each_frame_alone(sigma):
    estimate, _, _ = _movie((6, 2, 20, 22))
    got = gaussian_frames(da.from_array(estimate, chunks=(4, 1, 7, 9)), sigma).compute()
    for index in np.ndindex(estimate.shape[:2]):
        ref = ndimage.gaussian_filter(estimate[index].astype(np.float32), sigma, mode="reflect")
        np.testing.assert_allclose(got[index], ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_gaussian_frames_refuses_a_bad_sigma(sigma):
    with pytest.raises(ConfigError, match="sigma"):
        gaussian_frames(np.zeros((2, 4, 4)), sigma)


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


def test_evaluate_stores_scores_gaussian_references_and_picks_the_best_per_score(tmp_path):
    simulate(tmp_path / "noisy", truth=tmp_path / "truth", frames=16, size=(40, 40), photons=3)
    sigmas = (0.5, 1.5, 3.0)
    result = evaluate_stores(
        tmp_path / "noisy", truth=tmp_path / "truth", noisy=tmp_path / "noisy", sigmas=sigmas
    )
    assert sorted(result["gaussian"]) == list(sigmas)
    from srdvol.ngff.labels import read_masks
    from srdvol.ngff.read import open_image

    noisy, truth = open_image(tmp_path / "noisy"), open_image(tmp_path / "truth")
    masks = read_masks(tmp_path / "truth")
    for sigma in sigmas:
        filtered = ndimage.gaussian_filter(
            noisy.values.astype(np.float32), (0, sigma, sigma), mode="reflect"
        )
        ref = evaluate(filtered, truth.values, masks=masks, offset=result["offset"])
        assert result["gaussian"][sigma]["snr_db"] == pytest.approx(ref["snr_db"], rel=1e-6)
    for key in ("snr_db", "ssim", "trace_r", "pixel_r"):
        best = max(sigmas, key=lambda s: result["gaussian"][s][key])
        assert result["gaussian_best"][key] == best, key
    # A Gaussian filter helps the SNR of a noisy movie and flattens its pixels' transients.
    best_snr = result["gaussian"][result["gaussian_best"]["snr_db"]]
    assert best_snr["snr_db"] > result["noisy"]["snr_db"] + 3
    assert result["gaussian"][3.0]["pixel_gain"] < result["gaussian"][0.5]["pixel_gain"]
    text = format_metrics(result)
    assert "gaussian σ=" in text and "best SNR" in text and "pixel_gain" in text
    rows = [line.split()[0] for line in text.splitlines()[2:-1]]
    assert rows[0] == "noisy" and rows[-1] == "estimate"
    none = evaluate_stores(
        tmp_path / "noisy",
        truth=tmp_path / "truth",
        noisy=tmp_path / "noisy",
        sigmas=parse_sigmas("none"),
    )
    assert "gaussian" not in none and "gaussian σ" not in format_metrics(none)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, DEFAULT_SIGMAS), ("none", ()), ("2,1, 1.5", (1.0, 1.5, 2.0)), ("1,1", (1.0,))],
)
def test_gaussian_sigmas_parse(text, expected):
    assert parse_sigmas(text) == expected


@pytest.mark.parametrize("text", ["a,b", "0", "-1,2", "inf"])
def test_bad_gaussian_sigmas_name_the_option(text):
    with pytest.raises(ConfigError, match="gaussian"):
        parse_sigmas(text)


def test_evaluate_stores_refuses_a_store_of_another_shape(tmp_path):
    simulate(tmp_path / "a", truth=tmp_path / "ta", frames=16, size=(24, 24))
    simulate(tmp_path / "b", truth=tmp_path / "tb", frames=16, size=(24, 26))
    with pytest.raises(InputError, match=r"vs .*ta"):
        evaluate_stores(tmp_path / "b", truth=tmp_path / "ta")
