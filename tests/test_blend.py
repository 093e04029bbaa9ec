"""Tests for srdvol.core.blend: the weight sums and the final division of overlap-add."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srdvol.core.blend import divide, weight_sums
from srdvol.core.tiling import lattice, stride, window, window_1d


@given(
    length=st.integers(1, 120),
    patch=st.integers(1, 40),
    overlap=st.floats(0, 0.9),
    kind=st.sampled_from(["tent", "cos2"]),
)
@settings(max_examples=100, deadline=None)
def test_weight_sums_equal_adding_every_window(length, patch, overlap, kind):
    step = stride(patch, overlap)
    brute = np.zeros(max(length, patch))
    for start in lattice(length, patch, step):
        brute[start : start + patch] += window_1d(patch, kind)
    sums = weight_sums(length, patch, step, kind)
    np.testing.assert_array_equal(sums, brute[:length])
    assert np.all(sums >= 1)
    lo, hi = length // 3, max(length // 3, length - 2)
    np.testing.assert_array_equal(weight_sums(length, patch, step, kind, lo, hi), sums[lo:hi])


def test_separable_weight_sums_equal_the_3d_sum_exactly():
    # Σw of a 3-D lattice of separable windows is the product of the per-axis sums; with
    # integer weights both are exact, so a whole-array pass that adds 3-D windows agrees.
    shape, patch, overlap = (21, 13, 9), (8, 5, 4), 0.4
    den = np.zeros([max(n, p) for n, p in zip(shape, patch, strict=True)])
    starts = [lattice(n, p, stride(p, overlap)) for n, p in zip(shape, patch, strict=True)]
    for corner in itertools.product(*starts):
        den[tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))] += window(
            patch, "cos2"
        )
    per_axis = [
        weight_sums(n, p, stride(p, overlap), "cos2") for n, p in zip(shape, patch, strict=True)
    ]
    num = np.random.default_rng(0).random(shape) * den[:21, :13, :9]
    np.testing.assert_array_equal(divide(num, per_axis), (num / den[:21, :13, :9]).astype("f4"))


def test_divide_broadcasts_over_leading_axes_and_rounds_once():
    num = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) * 7.0
    sums = [np.array([1.0, 3.0, 7.0]), np.array([1.0, 2.0, 3.0, 5.0])]
    out = divide(num, sums)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (num / np.multiply.outer(*sums)).astype(np.float32))


def test_divide_refuses_uncovered_positions():
    with pytest.raises(RuntimeError, match="covered by no patch"):
        divide(np.ones((2, 2)), [np.array([1.0, 0.0]), np.ones(2)])
