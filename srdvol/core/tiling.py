"""The global patch lattice, blending windows and block plans.

Every patch the model sees sits on one lattice per axis, fixed by the array length, the patch size
and the stride: starts ``0, s, 2s, ...`` with the last start snapped to ``length - patch``. The
lattice does not depend on how the array is cut into blocks. A block *owns* the patches whose
start lies in its core and predicts each of them once; it reads its core plus a halo of
``patch - 1`` on the high side of each axis (where its last patches end) and hands the part of
its weighted sums that lies past its high edges to the neighbouring blocks (overlap-add).

Window weights are small integers, so every weighted sum is exact in float64 and the result does
not depend on the order in which a voxel's contributions are added, that is, on the blocks.
This module is pure numpy: no dask, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from srdvol.errors import ConfigError, flag
from srdvol.values import Window, check_overlap

__all__ = [
    "COS2_SCALE",
    "HALO_SHARE",
    "MOVIE_ORDER",
    "BlockMemory",
    "BlockPlan",
    "Window",
    "axis_blocks",
    "lattice",
    "owned",
    "plan_blocks",
    "stride",
    "touching",
    "window",
    "window_1d",
]

#: The movie axes in the order blocks of one movie are visited (t slowest).
MOVIE_ORDER = ("t", "y", "x")


def stride(patch: int, overlap: float) -> int:
    """Distance between neighbouring patch starts: ``max(1, round(patch * (1 - overlap)))``.

    Parameters
    ----------
    patch
        Patch length along the axis (>= 1).
    overlap
        Fraction of the patch shared by neighbours (:func:`srdvol.values.check_overlap`).
    """
    if patch < 1:
        raise ConfigError(flag("patch"), f"patch length {patch} is not positive", "give sizes >= 1")
    return max(1, round(patch * (1.0 - check_overlap(overlap))))


def lattice(length: int, patch: int, step: int) -> np.ndarray:
    """Patch starts along one axis of ``length`` voxels.

    Starts are ``0, step, 2*step, ...`` below ``length - patch``, then ``length - patch`` (the last
    patch is snapped to the end). An axis no longer than the patch has the single start 0 (the
    caller reflect-pads it to the patch).

    Returns
    -------
    numpy.ndarray
        Sorted, distinct int64 starts.
    """
    last = length - patch
    if last <= 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, last, step, dtype=np.int64)
    return np.append(starts, np.int64(last))


def touching(starts: np.ndarray, patch: int, lo: int, hi: int) -> np.ndarray:
    """The starts whose patch ``[start, start + patch)`` intersects ``[lo, hi)``."""
    return starts[(starts < hi) & (starts + patch > lo)]


def owned(starts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The starts that lie in ``[lo, hi)``: the patches a block with that core predicts."""
    return starts[(starts >= lo) & (starts < hi)]


#: cos² weights are ``sin²`` sampled at voxel centres, scaled by this and rounded (at least 1).
COS2_SCALE = 128


def window_1d(patch: int, kind: Window | str = Window.TENT) -> np.ndarray:
    """A symmetric profile of ``patch`` positive integer weights (as float64).

    Tent: ``patch - |2i + 1 - patch|``, which is ``patch`` times the tent ``1 - |2c - 1|``
    sampled at voxel centres ``c = (i + 0.5) / patch`` (1, 3, 3, 1 for a patch of 4). cos²:
    ``max(1, round(128 sin²(pi c)))``. Only ratios of weights matter (the blend divides by
    the weight sum); integers keep the product of three axes below 2**24 for patches up to 256,
    so that ``w * pred`` of a float32 prediction is exact in float64 and so is every sum of such
    terms whose magnitudes are alike: the blend is then the same whatever the order of additions
    (float-valued weights made the last bit depend on which block added first).
    """
    kind = Window(kind)
    i = np.arange(patch, dtype=np.float64)
    if kind is Window.TENT:
        return patch - np.abs(2.0 * i + 1.0 - patch)
    centre = (i + 0.5) / patch
    return np.maximum(1.0, np.rint(COS2_SCALE * np.sin(np.pi * centre) ** 2))


def window(patch: Sequence[int], kind: Window | str = Window.TENT) -> np.ndarray:
    """Separable n-d window: the float64 outer product of :func:`window_1d` along each axis."""
    out = np.ones((), dtype=np.float64)
    for n in patch:
        out = np.multiply.outer(out, window_1d(n, kind))
    return out


def axis_blocks(length: int, block: int, *, depth: int) -> tuple[int, ...]:
    """Cut an axis into blocks of ``block`` voxels (the last may be shorter).

    A trailing block shorter than ``depth`` is merged into its predecessor: a block's halo and the
    sums it spills past its high edge reach only into its next neighbour when every block is at
    least ``depth`` long, and merging keeps every other boundary where it was (so alignment to
    output chunks survives).
    """
    if block >= length:
        return (length,)
    sizes = [block] * (length // block)
    rest = length - block * len(sizes)
    if rest:
        if rest < depth:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes)


@dataclass(frozen=True)
class BlockPlan:
    """How an array is cut into processing blocks.

    Attributes
    ----------
    dims
        Axis names in array order.
    shape
        Array shape.
    chunks
        Dask-style block sizes per axis (``((b0, b1, ...), ...)``); block boundaries sit on
        multiples of the output chunks.
    depth
        Halo per axis on the high side only: ``patch - 1`` on t, y, x where the axis is longer
        than the patch, 0 else. A block reads its core plus this halo, the extent of the patches
        it owns, and its Σw·pred past its core spills over as far.
    patch
        Patch size per movie axis, ``{"t": .., "y": .., "x": ..}``.
    stride
        Lattice stride per movie axis.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    depth: tuple[int, ...]
    patch: dict[str, int]
    stride: dict[str, int]

    @property
    def nblocks(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(len(c) for c in self.chunks)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The nominal (first) block shape."""
        return tuple(c[0] for c in self.chunks)

    def starts(self, axis: int) -> tuple[int, ...]:
        """Global start of every block along ``axis``."""
        return tuple(int(v) for v in np.cumsum((0, *self.chunks[axis][:-1])))

    def region(self, index: Sequence[int]) -> tuple[slice, ...]:
        """Global slices of the core of block ``index``."""
        out = []
        for a, i in enumerate(index):
            start = sum(self.chunks[a][:i])
            out.append(slice(start, start + self.chunks[a][i]))
        return tuple(out)

    def extended(self, index: Sequence[int]) -> tuple[slice, ...]:
        """Global slices of the core of block ``index`` plus its high-side halo (clipped)."""
        return tuple(
            slice(s.start, min(s.stop + d, n))
            for s, d, n in zip(self.region(index), self.depth, self.shape, strict=True)
        )

    @property
    def extended_chunks(self) -> tuple[tuple[int, ...], ...]:
        """Block sizes including the high-side halo: the chunks of the Σw·pred array."""
        out = []
        for a, sizes in enumerate(self.chunks):
            ends = np.cumsum(sizes)
            out.append(
                tuple(
                    int(n + min(self.depth[a], self.shape[a] - e))
                    for n, e in zip(sizes, ends, strict=True)
                )
            )
        return tuple(out)


class BlockMemory(NamedTuple):
    """What one worker may spend on blocks.

    Attributes
    ----------
    host
        Host bytes: the blocks it runs (:func:`block_bytes`) plus what waits for the next layer
        of blocks along t (their input, read early for halos, and the sums spilled into them).
    device
        Device bytes a block's region may take as float32 input plus float64 sums (when the
        sums are accumulated on the GPU); None: no device limit.
    """

    host: int
    device: int | None = None


def block_bytes(core: int, region: int, itemsize: int) -> int:
    """Host bytes of a worker's blocks: the block in the model (its input region and the
    float64 Σw·pred over it), the next block waiting for the model with its input region, and
    the last one being combined (its Σw·pred until the spills are cut, the float32 output)."""
    return region * (itemsize + 8) + region * itemsize + region * 8 + core * 4


#: Default blocks stop growing along an axis once its halo is at most this share of the block:
#: each patch runs once whatever the blocks, so larger blocks would only save the float64 sums
#: passed across edges, and they cost memory that grows with the input until the budget caps
#: it (the peak would then depend on the input's size, and fewer blocks pipeline worse).
HALO_SHARE = 1 / 8


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def plan_blocks(
    shape: Sequence[int],
    *,
    dims: Sequence[str],
    patch: Mapping[str, int],
    overlap: float,
    chunks: Sequence[int],
    block: Mapping[str, int] | None = None,
    memory: int | BlockMemory = 4 * 2**30,
    itemsize: int = 2,
) -> BlockPlan:
    """Choose processing blocks aligned to the output chunks.

    Parameters
    ----------
    shape
        Array shape.
    dims
        Axis names (t, y, x required; c and z optional), in array order.
    patch
        Patch size per movie axis ``{"t", "y", "x"}``.
    overlap
        Patch overlap fraction in ``[0, 1)``.
    chunks
        Output chunk (or shard) shape; block boundaries are multiples of it.
    block
        Requested block size per movie axis; rounded up to chunk multiples and to at least the
        halo. ``None`` grows blocks from the chunks (see below).
    memory
        What a worker may spend on blocks (used when ``block`` is None): a
        :class:`BlockMemory`, or its host bytes alone (no device limit).
    itemsize
        Bytes per input voxel.

    Returns
    -------
    BlockPlan
        c and z blocks are one output chunk deep with no halo (each (c, z) plane is its own
        movie). Default blocks grow by doubling the movie axis whose halo costs the most
        (``(patch - 1) / block``, t first on ties: its halo dominates short blocks) while the
        memory allows and that halo is more than :data:`HALO_SHARE` of the block.
    """
    dims = tuple(dims)
    if len(shape) != len(dims) or len(chunks) != len(dims):
        raise ConfigError(
            flag("chunks"),
            f"chunks {tuple(chunks)} do not match dims {dims}",
            "give one chunk size per axis",
        )
    steps = {a: stride(int(patch[a]), overlap) for a in MOVIE_ORDER}
    depth = []
    for a, n in zip(dims, shape, strict=True):
        p = int(patch[a]) if a in steps else 1
        depth.append(p - 1 if a in steps and n > p else 0)
    sizes = {}
    for a, n, c, d in zip(dims, shape, chunks, depth, strict=True):
        if a not in steps or n <= int(patch[a]):
            # Partition axes: one chunk per block; short movie axes: one block (padded inside).
            sizes[a] = c if a not in steps else n
            continue
        want = block[a] if block is not None and a in block else c
        sizes[a] = min(_round_up(max(want, d), c), n)
    if block is None:
        budget = memory if isinstance(memory, BlockMemory) else BlockMemory(int(memory))
        sizes = _grow(
            sizes,
            dims=dims,
            shape=shape,
            chunks=chunks,
            depth=depth,
            memory=budget.host,
            device_memory=budget.device,
            itemsize=itemsize,
        )
    out = tuple(
        axis_blocks(n, sizes[a], depth=d) for a, n, d in zip(dims, shape, depth, strict=True)
    )
    return BlockPlan(
        dims=dims,
        shape=tuple(int(n) for n in shape),
        chunks=out,
        depth=tuple(depth),
        patch={a: int(patch[a]) for a in MOVIE_ORDER},
        stride=steps,
    )


def plan_memory(
    sizes: Mapping[str, int],
    *,
    dims: Sequence[str],
    shape: Sequence[int],
    depth: Sequence[int],
    itemsize: int,
) -> tuple[int, int]:
    """Host bytes a worker needs for blocks of ``sizes`` and device bytes of one block's region.

    Host: :func:`block_bytes` plus one layer of the movie's blocks waiting for the next layer
    along t: each with the input block read early for a halo, and the float64 sums spilled past
    its t edge (spills across y and x are taken within the layer, soon). Device: the region in
    the input dtype, widened to float32 as patches are gathered, and its float64 sums.
    """
    core = region = layer = spill = 1
    for a, n, d in zip(dims, shape, depth, strict=True):
        blocks = axis_blocks(n, sizes[a], depth=d)  # as cut: a short tail joins the last block
        extent = min(blocks[0] + d, n)
        core *= blocks[0]
        region *= extent
        spill *= extent - blocks[0] if a == MOVIE_ORDER[0] else extent
        if a in MOVIE_ORDER[1:]:
            layer *= len(blocks)
    host = block_bytes(core, region, itemsize) + layer * (core * itemsize + spill * 8)
    return host, region * (itemsize + 8)


def _grow(
    sizes: dict[str, int],
    *,
    dims: tuple[str, ...],
    shape: Sequence[int],
    chunks: Sequence[int],
    depth: Sequence[int],
    memory: int,
    device_memory: int | None,
    itemsize: int,
) -> dict[str, int]:
    sizes = dict(sizes)
    full = dict(zip(dims, shape, strict=True))
    step = dict(zip(dims, chunks, strict=True))
    halo = dict(zip(dims, depth, strict=True))

    def need(trial: Mapping[str, int]) -> tuple[int, int]:
        return plan_memory(trial, dims=dims, shape=shape, depth=depth, itemsize=itemsize)

    def fits(trial: Mapping[str, int]) -> bool:
        host, device = need(trial)
        if device_memory is not None and device > device_memory:
            return False
        # Within the budget, or less than now: fewer, wider blocks per layer can shrink what
        # waits for the next layer more than the block grows.
        return host <= memory or host <= need(sizes)[0]

    while True:
        # The axis whose halo costs the most relative to the block first (t on ties); a larger
        # step first, then one chunk.
        axes = sorted(
            (a for a in MOVIE_ORDER if halo[a] / sizes[a] > HALO_SHARE and sizes[a] < full[a]),
            key=lambda k: (-halo[k] / sizes[k], MOVIE_ORDER.index(k)),
        )
        for a in axes:
            grown = False
            for target in (2 * sizes[a], sizes[a] + step[a]):
                trial = dict(sizes)
                trial[a] = min(_round_up(target, step[a]), full[a])
                if full[a] - trial[a] < halo[a]:
                    trial[a] = full[a]  # a tail shorter than the halo would be merged anyway
                if fits(trial):
                    sizes, grown = trial, True
                    break
            if grown:
                break
        else:
            return sizes
