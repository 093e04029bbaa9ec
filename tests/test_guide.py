"""Tests for srdvol.predict.guide: each frame's activity filtered with the input's mean image."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from scipy import ndimage

from srdvol.dask.graph import denoise
from srdvol.predict.anchor import anchor_to_input
from srdvol.predict.block import predict_array
from srdvol.predict.guide import GUIDE_EPS, GUIDE_FRAMES, guide_frames, guided_filter, mean_image
from srdvol.predict.predictors import ModelPredictor


def _reference(
    p: np.ndarray, guide: np.ndarray, radius: int, eps: float, weight_eps: float | None = None
) -> np.ndarray:
    """He et al.'s guided filter written with scipy, frame by frame, borders mirrored, with the
    windows' fits averaged with weights 1 / (residual variance + weight_eps, default eps)."""
    weight_eps = eps if weight_eps is None else weight_eps
    size = 2 * radius + 1
    out = np.empty_like(p, dtype=np.float64)
    for i in range(p.shape[0]):
        image = guide[i].astype(np.float64)

        def box(v):
            return ndimage.uniform_filter(v, size, mode="mirror")

        mean_i = box(image)
        var_i = box(image * image) - mean_i**2
        for j in range(p.shape[1]):
            frame = p[i, j].astype(np.float64)
            mean_p = box(frame)
            cov = box(image * frame) - mean_i * mean_p
            a = cov / (var_i + eps)
            b = mean_p - a * mean_i
            residual = np.maximum(box(frame * frame) - mean_p**2 - a * cov, 0)
            w = 1 / (residual + weight_eps)
            out[i, j] = (box(w * a) * image + box(w * b)) / box(w)
    return out


@pytest.mark.parametrize(
    ("radius", "eps", "weight_eps"),
    [(1, 0.01, None), (2, 0.01, None), (3, 0.5, None), (2, 1e-4, 0.5)],
)
def test_guided_filter_matches_a_scipy_reference(radius, eps, weight_eps):
    rng = np.random.default_rng(radius)
    guide = rng.normal(0, 1, size=(2, 17, 20)).astype(np.float32)
    p = rng.normal(0, 1, size=(2, 3, 17, 20)).astype(np.float32)
    got = guided_filter(
        torch.from_numpy(p), torch.from_numpy(guide), radius, eps, weight_eps=weight_eps
    ).numpy()
    expected = _reference(p, guide, radius, eps, weight_eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_activity_that_follows_the_mean_image_passes_and_noise_does_not():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    cell = np.exp(-((yy - 20.0) ** 2 + (xx - 18.0) ** 2) / (2 * 5.0**2))  # a soma's brightness
    image = (0.2 + 3 * cell).astype(np.float32)[None]
    trace = rng.uniform(-1, 2, size=6)
    activity = (trace[:, None, None] * cell).astype(np.float32)[None]  # ΔF = trace x shape
    got = guided_filter(torch.from_numpy(activity), torch.from_numpy(image), 2).numpy()
    inner = (..., slice(4, 36), slice(4, 36))
    assert np.abs(got - activity)[inner].max() < 0.03 * np.abs(activity).max()
    noise = rng.normal(0, 1, size=(1, 6, 40, 40)).astype(np.float32)
    flat = np.ones((1, 40, 40), np.float32)  # no structure: the windows average the noise
    quiet = guided_filter(torch.from_numpy(noise), torch.from_numpy(flat), 2).numpy()
    assert quiet[inner].std() < 0.35 * noise[inner].std()


def test_mean_image_samples_evenly_and_numpy_equals_dask():
    assert guide_frames(5).tolist() == [0, 1, 2, 3, 4]
    picked = guide_frames(4 * GUIDE_FRAMES)
    assert len(picked) == GUIDE_FRAMES and picked[0] == 0 and picked[-1] == 4 * GUIDE_FRAMES - 1
    movie = np.random.default_rng(1).integers(0, 4000, size=(3, 300, 6, 7), dtype=np.uint16)
    got = mean_image(movie, axis=1)
    expected = movie[:, guide_frames(300)].astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    lazy = mean_image(da.from_array(movie, chunks=(1, 37, 4, 7)), axis=1)
    np.testing.assert_array_equal(lazy.compute(), got)  # integers: any chunking, same image


def test_model_predictor_guides_each_patch_then_anchors(tiny_model):
    rng = np.random.default_rng(3)
    x = rng.normal(100, 10, size=(3, 16, 12, 14)).astype(np.float32)
    guide = x.mean(axis=1)
    plain = ModelPredictor(tiny_model, device="cpu", batch_size=4)
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2)
    both = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2, anchor=3.0)
    own = plain(x)
    mean, std = float(plain.record.normalization.mean), float(plain.record.normalization.std)
    g = (guide - mean) / std
    n = (own - mean) / std
    expected = (g[:, None] + _reference(n - g[:, None], g, 2, GUIDE_EPS)) * std + mean
    t = torch.from_numpy
    got = guided.predict_tensor(t(x), t(guide)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)
    assert np.abs(got - own).max() > 0.5
    anchored = anchor_to_input(t(x), t(got), 3.0).numpy()
    np.testing.assert_allclose(both.predict_tensor(t(x), t(guide)).numpy(), anchored, atol=2e-3)
    assert "guide=2" in repr(guided)
    with pytest.raises(RuntimeError, match="mean image"):
        guided(x)  # patches alone: no mean image to guide with


def test_engine_blocks_give_the_in_memory_result(tiny_model):
    # The mean image is the whole movie's, whatever the blocks: several blocks equal one.
    movie = np.random.default_rng(4).integers(50, 400, size=(40, 44, 40), dtype=np.uint16)
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2, anchor=4.0)
    whole = predict_array(movie, guided, patch=(16, 16, 16), overlap=0.25)
    plain = predict_array(
        movie, ModelPredictor(tiny_model, device="cpu", batch_size=4, anchor=4.0),
        patch=(16, 16, 16), overlap=0.25,
    )  # fmt: skip
    assert np.abs(whole - plain).max() > 1
    lazy = denoise(
        da.from_array(movie, chunks=(8, 16, 8)),
        guided,
        patch=(16, 16, 16),
        overlap=0.25,
        block=(16, 16, 16),
        dims="tyx",
    )
    assert min(lazy.numblocks) > 1
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), whole)


def test_each_plane_is_guided_by_its_own_mean_image(tiny_model):
    # tzyx: every z plane is its own movie with its own mean image, in memory and in blocks.
    rng = np.random.default_rng(5)
    movie = rng.integers(50, 400, size=(40, 2, 40, 20), dtype=np.uint16)
    movie[:, 1] //= 4  # the planes differ: a mix-up of their images shows
    guided = ModelPredictor(tiny_model, device="cpu", batch_size=4, guide=2)
    both = predict_array(movie, guided, patch=(16, 16, 16), dims="tzyx")
    for z in range(2):
        alone = predict_array(movie[:, z], guided, patch=(16, 16, 16))
        np.testing.assert_array_equal(both[:, z], alone)
    lazy = denoise(
        da.from_array(movie, chunks=(8, 1, 8, 20)),
        guided,
        patch=(16, 16, 16),
        block=(16, 16, 20),
        dims="tzyx",
    )
    assert lazy.numblocks[1] == 2 and max(lazy.numblocks[0], lazy.numblocks[2]) > 1
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(lazy.compute(), both)
