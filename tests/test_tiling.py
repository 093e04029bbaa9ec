"""Tests for srdvol.tiling: the global lattice, windows and block plans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srdvol.errors import ConfigError
from srdvol.tiling import axis_blocks, lattice, plan_blocks, stride, touching, window, window_1d


@given(length=st.integers(1, 300), patch=st.integers(1, 64), overlap=st.floats(0, 0.95))
@settings(max_examples=200, deadline=None)
def test_lattice_covers_every_voxel_and_respects_stride(length, patch, overlap):
    s = stride(patch, overlap)
    starts = lattice(length, patch, s)
    assert np.all(np.diff(starts) > 0)  # sorted, distinct
    assert starts[0] == 0
    if length <= patch:
        assert starts.tolist() == [0]
        return
    assert starts[-1] + patch == length  # last patch snapped to the end
    assert np.all(np.diff(starts)[:-1] == s)  # regular stride except the snapped last step
    assert np.diff(starts)[-1] <= s
    covered = np.zeros(length, dtype=int)
    for a in starts:
        covered[a : a + patch] += 1
    assert covered.min() >= 1


def test_lattice_known_values():
    assert lattice(10, 4, 3).tolist() == [0, 3, 6]
    assert lattice(11, 4, 3).tolist() == [0, 3, 6, 7]
    assert lattice(4, 4, 3).tolist() == [0]
    assert stride(8, 0.25) == 6
    assert stride(1, 0.9) == 1


@pytest.mark.parametrize(("patch", "overlap"), [(0, 0.1), (4, 1.0), (4, -0.1)])
def test_bad_stride_arguments(patch, overlap):
    with pytest.raises(ConfigError):
        stride(patch, overlap)


def test_touching_selects_intersecting_patches():
    starts = lattice(20, 5, 4)  # 0 4 8 12 15
    assert touching(starts, 5, 5, 9).tolist() == [4, 8]
    assert touching(starts, 5, 0, 20).tolist() == starts.tolist()


@pytest.mark.parametrize("kind", ["tent", "cos2"])
@pytest.mark.parametrize("patch", [1, 2, 3, 8, 17])
def test_windows_positive_symmetric_separable(kind, patch):
    w = window_1d(patch, kind)
    assert w.dtype == np.float64  # the blending sums are float64 too
    assert np.all(w > 0)
    np.testing.assert_allclose(w, w[::-1])
    assert w.max() <= 1.0
    w3 = window((patch, 3, 2), kind)
    ref = np.einsum("i,j,k->ijk", w, window_1d(3, kind), window_1d(2, kind))
    np.testing.assert_allclose(w3, ref, rtol=1e-6)


def test_tent_known_values():
    np.testing.assert_allclose(window_1d(4, "tent"), [0.25, 0.75, 0.75, 0.25])


@given(
    length=st.integers(1, 200),
    chunk=st.integers(1, 40),
    mult=st.integers(1, 4),
    depth=st.integers(0, 30),
)
@settings(max_examples=200, deadline=None)
def test_axis_blocks_partition_and_alignment(length, chunk, mult, depth):
    block = max(chunk * mult, -(-depth // chunk) * chunk)
    sizes = axis_blocks(length, block, depth=depth)
    assert sum(sizes) == length
    assert all(n > 0 for n in sizes)
    edges = np.cumsum(sizes)[:-1]
    assert np.all(edges % chunk == 0)
    if len(sizes) > 1:
        assert min(sizes) >= depth


@given(
    t=st.integers(16, 80),
    z=st.integers(1, 3),
    y=st.integers(3, 90),
    x=st.integers(3, 90),
    pt=st.integers(2, 24),
    py=st.integers(2, 24),
    px=st.integers(2, 24),
    ct=st.integers(1, 20),
    cz=st.integers(1, 2),
    cy=st.integers(1, 30),
    cx=st.integers(1, 30),
    overlap=st.floats(0, 0.8),
    budget=st.integers(10_000, 5_000_000),
    given_block=st.booleans(),
    bt=st.integers(1, 40),
    bxy=st.integers(1, 40),
)
@settings(max_examples=150, deadline=None)
def test_plan_blocks_partition_align_and_halo(
    t, z, y, x, pt, py, px, ct, cz, cy, cx, overlap, budget, given_block, bt, bxy
):
    shape, dims, chunks = (t, z, y, x), "tzyx", (ct, cz, cy, cx)
    block = {"t": bt, "y": bxy, "x": bxy} if given_block else None
    plan = plan_blocks(
        shape,
        dims=dims,
        patch={"t": pt, "y": py, "x": px},
        overlap=overlap,
        chunks=chunks,
        block=block,
        memory=budget,
    )
    for a, (n, c, sizes) in enumerate(zip(shape, chunks, plan.chunks, strict=True)):
        assert sum(sizes) == n  # cores partition the axis
        assert np.all(np.cumsum(sizes)[:-1] % c == 0)  # aligned to output chunks
        assert plan.starts(a)[0] == 0
        if dims[a] == "z":
            assert plan.depth[a] == 0
            assert all(s <= c for s in sizes)
        else:
            p = {"t": pt, "y": py, "x": px}[dims[a]]
            assert plan.depth[a] == (p - 1 if n > p else 0)
            if len(sizes) > 1:
                assert min(sizes) >= plan.depth[a]  # neighbours can supply the full halo
    # The regions of all blocks tile the array exactly once.
    count = np.zeros(shape, dtype=np.int8)
    for index in np.ndindex(plan.nblocks):
        count[plan.region(index)] += 1
    assert np.all(count == 1)


def test_plan_grows_blocks_within_memory_budget():
    plan = plan_blocks(
        (64, 512, 512),
        dims="tyx",
        patch={"t": 16, "y": 32, "x": 32},
        overlap=0.25,
        chunks=(8, 64, 64),
        memory=64 * 2**20,
    )
    region = np.prod([b + 2 * d for b, d in zip(plan.block_shape, plan.depth, strict=True)])
    assert region * 16 <= 64 * 2**20
    assert np.prod(plan.block_shape) > 8 * 64 * 64 * 8  # grew well beyond one chunk
    assert plan.block_shape[1] % 64 == 0 and plan.block_shape[2] % 64 == 0


def test_plan_rejects_mismatched_chunks():
    with pytest.raises(ConfigError, match="chunks"):
        plan_blocks(
            (32, 8, 8), dims="tyx", patch={"t": 16, "y": 4, "x": 4}, overlap=0.25, chunks=(8, 8)
        )
