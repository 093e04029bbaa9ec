"""Tests for srdvol.core.tiling: the global lattice, windows and block plans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srdvol.core.tiling import (
    axis_blocks,
    lattice,
    plan_blocks,
    plan_cost,
    stride,
    touching,
    window,
    window_1d,
)
from srdvol.errors import ConfigError


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


def _brute_cost(plan):
    """Count plan costs voxel by voxel and patch by patch, without the per-axis shortcut."""
    movie = [plan.dims.index(a) for a in ("t", "y", "x")]
    sizes = [plan.patch[a] for a in ("t", "y", "x")]
    starts = [
        lattice(plan.shape[a], p, plan.stride[name])
        for a, p, name in zip(movie, sizes, ("t", "y", "x"), strict=True)
    ]
    patches = list(itertools.product(*starts))
    movies = int(np.prod([n for a, n in enumerate(plan.shape) if a not in movie]))
    # One whole-array pass: every lattice patch once; together they cover every voxel.
    covered = np.zeros([max(plan.shape[a], p) for a, p in zip(movie, sizes, strict=True)], int)
    for corner in patches:
        covered[tuple(slice(c, c + p) for c, p in zip(corner, sizes, strict=True))] += 1
    movie_shape = tuple(plan.shape[a] for a in movie)
    assert covered[tuple(slice(0, n) for n in movie_shape)].min() >= 1
    computed = read = 0
    for index in np.ndindex(plan.nblocks):
        core = plan.region(index)
        box = [(core[a].start, core[a].stop) for a in movie]
        for corner in patches:  # every lattice patch that overlaps the core, all axes at once
            if all(
                c < hi and c + p > lo for c, p, (lo, hi) in zip(corner, sizes, box, strict=True)
            ):
                computed += 1
        seen = np.zeros(plan.shape, bool)
        halo = tuple(
            slice(max(s.start - d, 0), min(s.stop + d, n))
            for s, d, n in zip(core, plan.depth, plan.shape, strict=True)
        )
        seen[halo] = True
        read += int(seen.sum())
    voxels = int(np.prod(plan.shape))
    return {
        "voxels": voxels,
        "lattice_patches": len(patches) * movies,
        "lattice_voxels": int(covered.sum()) * movies,
        "computed_patches": computed,
        "computed_voxels": computed * int(np.prod(sizes)),
        "read_voxels": read,
    }


@given(
    t=st.integers(16, 60),
    z=st.integers(1, 2),
    y=st.integers(3, 40),
    x=st.integers(3, 40),
    pt=st.integers(2, 20),
    pyx=st.integers(2, 20),
    ct=st.integers(1, 12),
    cyx=st.integers(1, 16),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.8, 0.95]),
    bt=st.integers(1, 30),
    byx=st.integers(1, 30),
)
@settings(max_examples=60, deadline=None)
def test_plan_cost_equals_brute_force_counting(t, z, y, x, pt, pyx, ct, cyx, overlap, bt, byx):
    plan = plan_blocks(
        (t, z, y, x),
        dims="tzyx",
        patch={"t": pt, "y": pyx, "x": pyx},
        overlap=overlap,
        chunks=(ct, 1, cyx, cyx),
        block={"t": bt, "y": byx, "x": byx},
    )
    cost = plan_cost(plan)
    expected = _brute_cost(plan)
    assert {k: getattr(cost, k) for k in expected} == expected
    assert cost.blocks == int(np.prod(plan.nblocks))
    # Recomputing patches per block can only add work; a single block adds none.
    assert cost.computed_voxels >= cost.lattice_voxels
    if cost.blocks // z == 1:
        assert cost.computed_voxels == cost.lattice_voxels
        assert cost.read_voxels == cost.voxels


def test_plan_cost_known_values():
    # A long axis at overlap 0.25 has about 4/3 coverage, so ~2.37 in three dimensions.
    plan = plan_blocks(
        (3000, 3000, 3000),
        dims="tyx",
        patch={"t": 16, "y": 16, "x": 16},
        overlap=0.25,
        chunks=(3000, 3000, 3000),
    )
    cost = plan_cost(plan)
    assert cost.lattice_ratio == pytest.approx((4 / 3) ** 3, rel=2e-3)
    assert cost.computed_ratio == cost.lattice_ratio
    # Two blocks along x, cut at 48, counted by hand on the one long axis of 96 voxels.
    plan = plan_blocks(
        (16, 16, 96),
        dims="tyx",
        patch={"t": 16, "y": 16, "x": 16},
        overlap=0.25,
        chunks=(16, 16, 48),
        block={"t": 16, "y": 16, "x": 48},
    )
    # x lattice: 0, 12, ..., 72, then 80 (snapped): 8 patches; block [0, 48) touches the
    # patches at 0..36 (4), block [48, 96) those at 36..80 (5): patch 36 runs twice.
    cost = plan_cost(plan)
    assert plan.nblocks == (1, 1, 2)
    assert cost.lattice_patches == 8
    assert cost.computed_patches == 9
    assert cost.lattice_ratio == pytest.approx(8 * 16 / 96)
    assert cost.computed_ratio == pytest.approx(9 * 16 / 96)
    # Each block reads its 48 core voxels plus a 15-voxel halo on its inner side.
    assert cost.read_ratio == pytest.approx(2 * 63 / 96)
    # A movie shorter than the patch is padded: model voxels count the padding.
    small = plan_blocks(
        (32, 64, 64),
        dims="tyx",
        patch={"t": 64, "y": 128, "x": 128},
        overlap=0.95,
        chunks=(16, 64, 64),
    )
    assert plan_cost(small).lattice_ratio == pytest.approx(8.0)
