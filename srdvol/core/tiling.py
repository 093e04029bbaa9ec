"""The global patch lattice, blending windows and block plans.

Every patch the model sees sits on one lattice per axis, fixed by the array length, the patch size
and the stride: starts ``0, s, 2s, ...`` with the last start snapped to ``length - patch``. Because
the lattice does not depend on how the array is cut into blocks, a block that evaluates every
lattice patch touching its core gets exactly the values one whole-array pass would give. This
module is pure numpy: no dask, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from srdvol.errors import ConfigError

__all__ = [
    "BlockPlan",
    "PlanCost",
    "Window",
    "axis_blocks",
    "lattice",
    "plan_blocks",
    "plan_cost",
    "stride",
    "touching",
    "window",
    "window_1d",
]


class Window(StrEnum):
    """Blending window across a patch: linear tent or cos² (Hann)."""

    TENT = "tent"
    COS2 = "cos2"


def stride(patch: int, overlap: float) -> int:
    """Distance between neighbouring patch starts: ``max(1, round(patch * (1 - overlap)))``.

    Parameters
    ----------
    patch
        Patch length along the axis (>= 1).
    overlap
        Fraction of the patch shared by neighbours, in ``[0, 1)``.
    """
    if patch < 1:
        raise ConfigError("--patch", f"patch length {patch} is not positive", "give sizes >= 1")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError("--overlap", f"overlap {overlap} is outside [0, 1)", "use e.g. 0.25")
    return max(1, round(patch * (1.0 - overlap)))


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


def window_1d(patch: int, kind: Window | str = Window.TENT) -> np.ndarray:
    """A symmetric weight profile of ``patch`` values, strictly positive everywhere.

    Sampling at voxel centres (``i + 0.5``) keeps the edge weights above zero, so every voxel of
    the array gets a positive weight sum even where only one patch covers it. float64, like the
    blending sums: float32 weights made each ``w * pred`` a float32 product, so even a voxel
    covered by a single patch came back 1 ulp off its prediction.
    """
    kind = Window(kind)
    centre = (np.arange(patch, dtype=np.float64) + 0.5) / patch  # in (0, 1)
    if kind is Window.TENT:
        return 1.0 - np.abs(2.0 * centre - 1.0)
    return np.sin(np.pi * centre) ** 2


def window(patch: Sequence[int], kind: Window | str = Window.TENT) -> np.ndarray:
    """Separable n-d window: the float64 outer product of :func:`window_1d` along each axis."""
    out = np.ones((), dtype=np.float64)
    for n in patch:
        out = np.multiply.outer(out, window_1d(n, kind))
    return out


def axis_blocks(length: int, block: int, *, depth: int) -> tuple[int, ...]:
    """Cut an axis into blocks of ``block`` voxels (the last may be shorter).

    A trailing block shorter than ``depth`` is merged into its predecessor: ``map_overlap`` can only
    borrow a halo of ``depth`` from a neighbour at least that long, and merging keeps every other
    boundary where it was (so alignment to output chunks survives).
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
        Halo per axis (``patch - 1`` on t, y, x where the axis is longer than the patch; 0 else).
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


#: Bytes held per voxel of a block's read region: the input, a float32 copy, and the float64
#: sums Σw·pred and Σw of :class:`srdvol.core.blend.Accumulator`.
_BYTES_PER_VOXEL = 24


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
    memory: int = 512 * 2**20,
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
        halo. ``None`` grows blocks from the chunks until a block's read region (core plus halo)
        would pass ``memory`` bytes.
    memory
        Budget in bytes for one block's working buffers (used when ``block`` is None).

    Returns
    -------
    BlockPlan
        c and z blocks are one output chunk deep with no halo (each (c, z) plane is its own movie).
    """
    dims = tuple(dims)
    if len(shape) != len(dims) or len(chunks) != len(dims):
        raise ConfigError(
            "--chunks",
            f"chunks {tuple(chunks)} do not match dims {dims}",
            "give one chunk size per axis",
        )
    steps = {a: stride(int(patch[a]), overlap) for a in ("t", "y", "x")}
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
        sizes = _grow(sizes, dims=dims, shape=shape, chunks=chunks, depth=depth, memory=memory)
    out = tuple(
        axis_blocks(n, sizes[a], depth=d) for a, n, d in zip(dims, shape, depth, strict=True)
    )
    return BlockPlan(
        dims=dims,
        shape=tuple(int(n) for n in shape),
        chunks=out,
        depth=tuple(depth),
        patch={a: int(patch[a]) for a in ("t", "y", "x")},
        stride=steps,
    )


def _region_bytes(sizes: Mapping[str, int], dims: Sequence[str], depth: Sequence[int]) -> int:
    return _BYTES_PER_VOXEL * math.prod(sizes[a] + 2 * d for a, d in zip(dims, depth, strict=True))


def _grow(
    sizes: dict[str, int],
    *,
    dims: tuple[str, ...],
    shape: Sequence[int],
    chunks: Sequence[int],
    depth: Sequence[int],
    memory: int,
) -> dict[str, int]:
    # Double the smallest movie axis first: near-isotropic blocks (in voxels) carry the least halo.
    sizes = dict(sizes)
    full = {a: n for a, n in zip(dims, shape, strict=True)}
    step = {a: c for a, c in zip(dims, chunks, strict=True)}
    open_axes = {a for a in ("t", "y", "x") if sizes[a] < full[a]}
    while open_axes:
        a = min(open_axes, key=lambda k: (sizes[k], k))
        trial = dict(sizes)
        trial[a] = min(_round_up(2 * sizes[a], step[a]), full[a])
        if _region_bytes(trial, dims, depth) > memory:
            open_axes.discard(a)
            continue
        sizes = trial
        if sizes[a] >= full[a]:
            open_axes.discard(a)
    return sizes


@dataclass(frozen=True)
class PlanCost:
    """What a block plan costs, counted exactly from its lattice and block boundaries.

    Voxel counts cover every (c, z) movie. A model voxel is one voxel of one patch fed to the
    network, padding included (an axis shorter than its patch is reflect-padded to it).

    Attributes
    ----------
    voxels
        Voxels of the array (input voxels = output voxels).
    lattice_patches, lattice_voxels
        Patches and model voxels of one whole-array pass: every lattice patch once.
    computed_patches, computed_voxels
        Patches and model voxels the block engine computes: every block runs every lattice
        patch that touches its core, so a patch that straddles block boundaries runs once per
        block it touches.
    read_voxels
        Input voxels the blocks read: each block's core plus its halo (``patch - 1`` on t, y, x,
        clipped at the array edges).
    blocks
        Number of blocks.
    """

    voxels: int
    lattice_patches: int
    lattice_voxels: int
    computed_patches: int
    computed_voxels: int
    read_voxels: int
    blocks: int

    @property
    def lattice_ratio(self) -> float:
        """Model voxels per output voxel of one whole-array pass (the lattice coverage)."""
        return self.lattice_voxels / self.voxels

    @property
    def computed_ratio(self) -> float:
        """Model voxels per output voxel that the block engine computes."""
        return self.computed_voxels / self.voxels

    @property
    def read_ratio(self) -> float:
        """Bytes read per input byte (core plus halo of every block)."""
        return self.read_voxels / self.voxels


def plan_cost(plan: BlockPlan) -> PlanCost:
    """Count the model voxels and input reads of a block plan (pure arithmetic, no data).

    Every count factorises over the axes: the blocks form a grid and the lattice is one set of
    starts per axis, so a block touches (patches along t) x (along y) x (along x) patches, and
    summing over the grid is the product of per-axis sums. c and z contribute their lengths.

    Parameters
    ----------
    plan
        From :func:`plan_blocks`.

    Returns
    -------
    PlanCost
    """
    counts = dict.fromkeys(("voxels", "lp", "lv", "cp", "cv", "read"), 1)
    for axis, (name, length) in enumerate(zip(plan.dims, plan.shape, strict=True)):
        if name not in plan.patch:
            # c and z: every plane is its own movie with the same lattice, read once, no halo.
            counts = {key: value * length for key, value in counts.items()}
            continue
        size, depth = plan.patch[name], plan.depth[axis]
        starts = lattice(length, size, plan.stride[name])
        touched = read = 0
        for lo, extent in zip(plan.starts(axis), plan.chunks[axis], strict=True):
            touched += len(touching(starts, size, lo, lo + extent))
            read += min(lo + extent + depth, length) - max(lo - depth, 0)
        counts["voxels"] *= length
        counts["lp"] *= len(starts)
        counts["lv"] *= len(starts) * size
        counts["cp"] *= touched
        counts["cv"] *= touched * size
        counts["read"] *= read
    return PlanCost(
        voxels=counts["voxels"],
        lattice_patches=counts["lp"],
        lattice_voxels=counts["lv"],
        computed_patches=counts["cp"],
        computed_voxels=counts["cv"],
        read_voxels=counts["read"],
        blocks=math.prod(plan.nblocks),
    )
