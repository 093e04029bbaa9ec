"""Tests for srdvol.core.blend: the weighted accumulator."""

from __future__ import annotations

import numpy as np
import pytest

from srdvol.core.blend import Accumulator


def test_weighted_average_matches_numpy_reference():
    rng = np.random.default_rng(1)
    acc = Accumulator((6, 5))
    num = np.zeros((6, 5))
    den = np.zeros((6, 5))
    for r0, c0 in [(0, 0), (2, 1), (3, 2)]:
        region = (slice(r0, r0 + 3), slice(c0, c0 + 3))
        pred = rng.random((3, 3)).astype(np.float32)
        w = rng.random((3, 3)).astype(np.float32) + 0.1
        acc.add(pred, w, region)
        num[region] += w * pred
        den[region] += w
    assert not np.all(den > 0)  # corner (0, 4) is never covered
    with pytest.raises(RuntimeError, match="covered by no patch"):
        acc.finalize()
    core = (slice(2, 5), slice(2, 4))  # covered by all three predictions
    np.testing.assert_allclose(acc.finalize_region(core), num[core] / den[core], rtol=1e-6)


def test_full_coverage_finalize_and_constant_prediction():
    acc = Accumulator((4, 4))
    for region in [(slice(0, 3), slice(0, 4)), (slice(1, 4), slice(0, 4))]:
        acc.add(np.full((3, 4), 7.5, np.float32), np.linspace(0.1, 1, 4, dtype=np.float32), region)
    out = acc.finalize()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 7.5)


def test_shape_mismatch_is_refused():
    acc = Accumulator((4, 4))
    with pytest.raises(ValueError, match="does not match"):
        acc.add(
            np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32), (slice(0, 3), slice(0, 3))
        )
