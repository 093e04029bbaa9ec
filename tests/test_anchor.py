"""Tests for srdvol.predict.anchor: the output keeps the input's intensities at coarse scales."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage

from srdvol.errors import ConfigError
from srdvol.predict.anchor import SHAPE_MAX, anchor_to_input, gaussian_kernel, shape_of
from srdvol.predict.predictors import ModelPredictor


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    noisy = rng.normal(100, 20, size=shape).astype(np.float32)
    denoised = (noisy + rng.normal(0, 5, size=shape)).astype(np.float32)
    return noisy, denoised


@pytest.mark.parametrize("sigma", [0.7, 1.5, 2.0])
def test_anchor_is_the_network_plus_the_blurred_residual(sigma):
    # reference: scipy's Gaussian of each frame, mirrored at the edges like torch's reflect pad
    noisy, denoised = _pair((2, 3, 20, 17))
    got = anchor_to_input(torch.from_numpy(noisy), torch.from_numpy(denoised), sigma).numpy()
    blurred = ndimage.gaussian_filter(noisy - denoised, (0, 0, sigma, sigma), mode="mirror")
    np.testing.assert_allclose(got, denoised + blurred, rtol=0, atol=1e-4)


def test_anchor_removes_a_smooth_bias_and_keeps_fine_detail():
    noisy, _ = _pair((1, 2, 32, 32))
    yy, xx = np.mgrid[:32, :32]
    detail = np.where((yy + xx) % 2, 3.0, -3.0).astype(np.float32)  # a checkerboard
    bias = (10 + 0.2 * yy).astype(np.float32)  # a ramp, as a shrunk cell's is smooth
    denoised = noisy + detail + bias
    got = anchor_to_input(torch.from_numpy(noisy), torch.from_numpy(denoised), 4.0).numpy()
    inner = (..., slice(12, 20), slice(12, 20))  # away from the reflected edges
    # the ramp is gone, the checkerboard (nothing at coarse scales) is kept
    kept = np.broadcast_to(detail, got.shape)
    np.testing.assert_allclose((got - noisy)[inner], kept[inner], atol=0.05)
    assert np.abs(got - denoised).max() > 9


def test_anchor_is_affine_in_the_units_and_zero_turns_it_off():
    noisy, denoised = _pair((2, 2, 12, 40))
    n, d = torch.from_numpy(noisy), torch.from_numpy(denoised)
    base = anchor_to_input(n, d, 4.0)  # y (12 pixels) caps the radius at 11
    np.testing.assert_allclose(anchor_to_input(3 * n + 7, 3 * d + 7, 4.0), 3 * base + 7, atol=1e-3)
    assert anchor_to_input(n, d, 0.0) is d
    taps = gaussian_kernel(4.0, 12)
    assert len(taps) == 23 and abs(sum(taps) - 1) < 1e-12
    assert len(gaussian_kernel(4.0, 1)) == 1  # one pixel: nothing to blur


def _cell_image(offset=50.0, size=32):
    """A mean image: a flat background and one bright disk of radius 5 (a soma)."""
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - 16) ** 2 + (xx - 15) ** 2 <= 25).astype(np.float32)
    return (offset + 100 * disk).astype(np.float32), disk


def test_shaped_anchor_puts_back_a_residual_shaped_like_the_mean_image():
    # The network missed 30 % of a cell's activity, which follows the cell's brightness: the
    # Gaussian anchor spreads that over the cell's surroundings, the shaped one puts it back.
    image, disk = _cell_image()
    noisy, _ = _pair((2, 3, 32, 32))
    denoised = noisy - 0.3 * (image - 50)
    t = torch.from_numpy
    images = t(np.stack([image, image]))
    for sigma in (2.0, 4.0):
        shaped = anchor_to_input(t(noisy), t(denoised), sigma, images).numpy()
        np.testing.assert_allclose(shaped, noisy, rtol=0, atol=0.1)  # all 30 of 30 back
        gaussian = anchor_to_input(t(noisy), t(denoised), sigma).numpy()
        inside = disk.astype(bool)
        assert np.mean((noisy - gaussian)[..., inside]) > 5  # over 5 of 30 still missing
        assert np.abs(gaussian - noisy)[..., ~inside].max() > 3  # and some put beside it


def test_shape_of_a_flat_image_is_the_gaussian_anchor_and_units_do_not_matter():
    noisy, denoised = _pair((2, 3, 20, 24))
    t = torch.from_numpy
    flat = torch.full((2, 20, 24), 7.0)
    np.testing.assert_allclose(shape_of(flat, 3.0).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        anchor_to_input(t(noisy), t(denoised), 3.0, flat),
        anchor_to_input(t(noisy), t(denoised), 3.0),
        atol=1e-4,
    )
    image = t(np.stack([_cell_image()[0], _cell_image(offset=10)[0]]))
    shape = shape_of(image, 4.0)
    np.testing.assert_allclose(shape_of(3 * image + 40, 4.0), shape, rtol=1e-4, atol=1e-5)
    assert shape.max() > 1.5 and shape.min() < 0.1  # raised on the cell, lowered beside it


def test_shape_of_a_lone_bright_pixel_is_capped():
    image = torch.zeros(1, 24, 24)
    image[0, 12, 12] = 1000.0  # a hot pixel: its share would be about 2 pi sigma² = 100
    shape = shape_of(image, 4.0)
    assert float(shape.max()) == SHAPE_MAX
    assert float(shape[0, 0, 0]) == pytest.approx(1.0, abs=0.01)  # far off: the plain anchor


def test_model_predictor_anchors_each_patch_after_the_network(tiny_model):
    path = tiny_model
    x = np.random.default_rng(2).normal(100, 10, size=(3, 16, 8, 12)).astype(np.float32)
    plain = ModelPredictor(path, device="cpu", batch_size=4)
    anchored = ModelPredictor(path, device="cpu", batch_size=4, anchor=2.5)
    expected = anchor_to_input(torch.from_numpy(x), torch.from_numpy(plain(x)), 2.5).numpy()
    got = anchored(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert np.abs(got - plain(x)).max() > 0.1
    np.testing.assert_array_equal(anchored(x[:1]), got[:1])  # independent of the batch
    again = pickle.loads(pickle.dumps(anchored))
    assert again.anchor == 2.5 and "anchor=2.5" in repr(again)
    for bad in (float("inf"), float("nan"), -1.0):  # refused before any model is loaded
        with pytest.raises(ConfigError, match="finite sigma"):
            ModelPredictor(path, device="cpu", anchor=bad)
    both = ModelPredictor(path, device="cpu", batch_size=4, tta=True, anchor=2.5)
    tta = ModelPredictor(path, device="cpu", batch_size=4, tta=True)
    expected = anchor_to_input(torch.from_numpy(x), torch.from_numpy(tta(x)), 2.5).numpy()
    np.testing.assert_allclose(both(x), expected, rtol=0, atol=1e-3)
