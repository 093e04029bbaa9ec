"""Tests for srdvol.core.tiling: the global lattice, windows and block plans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srdvol.core.cost import plan_cost
from srdvol.core.tiling import (
    HALO_SHARE,
    axis_blocks,
    block_bytes,
    lattice,
    owned,
    plan_blocks,
    plan_memory,
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


def test_touching_and_owned_select_patches():
    starts = lattice(20, 5, 4)  # 0 4 8 12 15
    assert touching(starts, 5, 5, 9).tolist() == [4, 8]
    assert touching(starts, 5, 0, 20).tolist() == starts.tolist()
    assert owned(starts, 5, 9).tolist() == [8]  # the patch at 4 belongs to the block before
    assert owned(starts, 0, 20).tolist() == starts.tolist()
    # Consecutive blocks own disjoint sets of starts that together are the lattice.
    cuts = [0, 3, 9, 13, 20]
    parts = [owned(starts, a, b).tolist() for a, b in itertools.pairwise(cuts)]
    assert list(itertools.chain(*parts)) == starts.tolist()


@pytest.mark.parametrize("kind", ["tent", "cos2"])
@pytest.mark.parametrize("patch", [1, 2, 3, 8, 17, 64, 128, 256])
def test_windows_are_small_positive_symmetric_integers(kind, patch):
    w = window_1d(patch, kind)
    assert w.dtype == np.float64  # the blending sums are float64 too
    assert np.all(w >= 1) and np.array_equal(w, np.rint(w))
    np.testing.assert_array_equal(w, w[::-1])
    assert w.max() <= max(patch, 128)
    # Three axes of weights times a float32 prediction fit a float64 mantissa (53 bits) with
    # room for the sum of a few such terms: the blend is exact.
    assert np.log2(w.max()) * 3 <= 24
    w3 = window((patch, 3, 2), kind)
    ref = np.einsum("i,j,k->ijk", w, window_1d(3, kind), window_1d(2, kind))
    np.testing.assert_array_equal(w3, ref)


def test_window_known_values():
    np.testing.assert_array_equal(window_1d(4, "tent"), [1, 3, 3, 1])  # 4 x (1/4, 3/4, ...)
    np.testing.assert_array_equal(window_1d(3, "tent"), [1, 3, 1])
    # 128 sin^2(pi (i + 0.5) / 4): 18.7, 109.3 -> 19, 109
    np.testing.assert_array_equal(window_1d(4, "cos2"), [19, 109, 109, 19])
    assert window_1d(256, "cos2")[0] == 1  # 128 sin^2(pi / 512) = 0.005: floored at 1


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
    shape, chunks, depth = (64, 512, 512), (8, 64, 64), (15, 31, 31)
    plan = plan_blocks(
        shape,
        dims="tyx",
        patch={"t": 16, "y": 32, "x": 32},
        overlap=0.25,
        chunks=chunks,
        memory=512 * 2**20,
    )
    sizes = dict(zip("tyx", plan.block_shape, strict=True))
    host, _ = plan_memory(sizes, dims="tyx", shape=shape, depth=depth, itemsize=2)
    assert host <= 512 * 2**20
    assert np.prod(plan.block_shape) > 8 * 64 * 64 * 8  # grew well beyond one chunk
    assert plan.block_shape[1] % 64 == 0 and plan.block_shape[2] % 64 == 0


def test_plan_grows_t_first_while_its_halo_dominates():
    # TB geometry: patch (64, 128, 128), chunks (16, 1, 512, 512): t's halo (63) is 4 times its
    # chunk, y's and x's (127) a quarter of theirs, so t grows first, until its halo share is no
    # longer the largest; then y and x grow too.
    shape, dims = (4000, 32, 2048, 2048), "tzyx"
    patch = {"t": 64, "y": 128, "x": 128}
    chunks = (16, 1, 512, 512)
    grown = []
    for gib in (8, 16, 38, 128):
        plan = plan_blocks(
            shape, dims=dims, patch=patch, overlap=0.25, chunks=chunks, memory=gib * 2**30
        )
        grown.append(plan.block_shape)
        t, z, y, x = plan.block_shape
        assert z == 1
        if min(y, x) < 2048:  # t's halo share ends up no larger than about y's and x's
            assert 63 / t <= 2 * 127 / min(y, x)
    assert grown[0][0] > 64 and grown[0][2:] == (512, 512)  # a small budget: only t grew
    volumes = [np.prod(b) for b in grown]
    assert volumes == sorted(volumes)  # more memory, larger blocks
    # a large one stops where no halo is more than HALO_SHARE of its block, and more memory
    # changes nothing: the blocks do not grow with what the worker has past that point
    t, _, y, x = grown[-1]
    assert 63 / t <= HALO_SHARE and 127 / y <= HALO_SHARE and 127 / x <= HALO_SHARE
    assert 63 / (t / 2) > HALO_SHARE and 127 / (y / 2) > HALO_SHARE and 127 / (x / 2) > HALO_SHARE
    huge = plan_blocks(shape, dims=dims, patch=patch, overlap=0.25, chunks=chunks, memory=2**45)
    assert huge.block_shape == grown[-1]


@given(
    t=st.integers(16, 400),
    y=st.integers(8, 300),
    x=st.integers(8, 300),
    pt=st.sampled_from([16, 32]),
    pyx=st.integers(4, 64),
    ct=st.integers(1, 32),
    cyx=st.integers(4, 64),
    memory=st.integers(10**5, 10**9),
    itemsize=st.sampled_from([1, 2, 4]),
)
@settings(max_examples=100, deadline=None)
def test_default_blocks_fit_the_budget_and_cannot_grow(t, y, x, pt, pyx, ct, cyx, memory, itemsize):
    shape, dims, chunks = (t, y, x), "tyx", (ct, cyx, cyx)
    patch = {"t": pt, "y": pyx, "x": pyx}
    plan = plan_blocks(
        shape,
        dims=dims,
        patch=patch,
        overlap=0.25,
        chunks=chunks,
        memory=memory,
        itemsize=itemsize,
    )
    sizes = dict(zip(dims, plan.block_shape, strict=True))
    smallest = plan_blocks(
        shape, dims=dims, patch=patch, overlap=0.25, chunks=chunks, block={a: 1 for a in dims}
    )
    host, _ = plan_memory(sizes, dims=dims, shape=shape, depth=plan.depth, itemsize=itemsize)
    least, _ = plan_memory(
        dict(zip(dims, smallest.block_shape, strict=True)),
        dims=dims,
        shape=shape,
        depth=plan.depth,
        itemsize=itemsize,
    )
    assert host <= max(memory, least)  # within the budget, or no more than the least blocks
    for a, n, c, d in zip(dims, shape, chunks, plan.depth, strict=True):
        if not d or sizes[a] >= n or d / sizes[a] <= HALO_SHARE:
            continue  # no halo, whole axis, or a halo already cheap enough
        trial = dict(sizes)
        trial[a] = min(n, -(-(sizes[a] + c) // c) * c)  # one more chunk
        if n - trial[a] < d:
            trial[a] = n
        more, _ = plan_memory(trial, dims=dims, shape=shape, depth=plan.depth, itemsize=itemsize)
        assert more > max(memory, host)  # no axis could take one more chunk


def test_block_bytes_counts_region_and_core():
    assert block_bytes(core=10, region=20, itemsize=2) == 20 * (2 + 8) + 20 * 2 + 20 * 8 + 10 * 4
    host, device = plan_memory(
        {"t": 16, "y": 8, "x": 8}, dims="tyx", shape=(32, 8, 8), depth=(15, 0, 0), itemsize=2
    )
    # two blocks along t: the first reads 31 frames; one layer of one block waits with its
    # input and the 15 frames of sums it spills into the next layer
    assert host == block_bytes(16 * 64, 31 * 64, 2) + (16 * 64 * 2 + 15 * 64 * 8)
    assert device == 31 * 64 * (2 + 8)


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
    corners = np.array(patches).reshape(-1, 3)
    owners = np.zeros(len(corners), int)
    region = 0
    for index in np.ndindex(plan.nblocks):
        core = plan.region(index)
        lo = np.array([core[a].start for a in movie])
        hi = np.array([core[a].stop for a in movie])
        mine = np.all((corners >= lo) & (corners < hi), axis=1)  # start in the core
        owners += mine
        seen = np.zeros(plan.shape, bool)
        seen[plan.extended(index)] = True
        region += int(seen.sum())
        # the region holds every patch the block owns
        ext = plan.extended(index)
        ends = np.minimum(corners[mine] + sizes, [plan.shape[a] for a in movie])
        assert np.all(ends <= [ext[a].stop for a in movie])
    assert set(owners.tolist()) == {movies}  # each patch of each movie: exactly one block
    voxels = int(np.prod(plan.shape))
    return {
        "voxels": voxels,
        "lattice_patches": len(patches) * movies,
        "lattice_voxels": int(covered.sum()) * movies,
        "computed_patches": int(owners.sum()),
        "computed_voxels": int(owners.sum()) * int(np.prod(sizes)),
        "region_voxels": region,
        "spill_voxels": region - voxels,
        "read_voxels": voxels,
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
    bt=st.integers(4, 30),
    byx=st.integers(4, 30),
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
    # Each patch is predicted once, whatever the blocks: no more work than one whole pass.
    assert cost.computed_voxels == cost.lattice_voxels
    assert cost.read_ratio == 1.0
    if cost.blocks // z == 1:
        assert cost.region_voxels == cost.voxels and cost.spill_voxels == 0


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
    # x lattice: 0, 12, ..., 72, then 80 (snapped): 8 patches; block [0, 48) owns the starts
    # 0..36 (4), block [48, 96) those at 48..80 (4): every patch once (the old engine ran 36 twice).
    cost = plan_cost(plan)
    assert plan.nblocks == (1, 1, 2)
    assert cost.lattice_patches == cost.computed_patches == 8
    assert cost.lattice_ratio == cost.computed_ratio == pytest.approx(8 * 16 / 96)
    # The first block reads its 48 core voxels plus a 15-voxel halo on its high side, the
    # second only its core; the halo's sums spill back as 15 voxels.
    assert cost.region_ratio == pytest.approx((63 + 48) / 96)
    assert cost.spill_ratio == pytest.approx(15 / 96)
    assert cost.read_ratio == 1.0
    # A movie shorter than the patch is padded: model voxels count the padding.
    small = plan_blocks(
        (32, 64, 64),
        dims="tyx",
        patch={"t": 64, "y": 128, "x": 128},
        overlap=0.95,
        chunks=(16, 64, 64),
    )
    assert plan_cost(small).lattice_ratio == pytest.approx(8.0)


def test_plan_extended_regions_and_chunks():
    plan = plan_blocks(
        (40, 20, 20),
        dims="tyx",
        patch={"t": 16, "y": 8, "x": 8},
        overlap=0.25,
        chunks=(16, 10, 10),
        block={"t": 16, "y": 10, "x": 10},
    )
    assert plan.chunks == ((16, 24), (10, 10), (10, 10))  # a tail of 8 < 15 is merged
    assert plan.depth == (15, 7, 7)
    assert plan.extended((0, 0, 1)) == (slice(0, 31), slice(0, 17), slice(10, 20))
    assert plan.extended_chunks == ((31, 24), (17, 10), (17, 10))
