"""What a block plan costs: model voxels, block regions and reads, counted from the lattice.

Pure arithmetic on a :class:`~srdvol.core.tiling.BlockPlan` (no data, no dask): ``srdvol info``
prints it and the engine benchmark compares it with what a run measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from srdvol.core.tiling import BlockPlan, lattice, owned

__all__ = ["PlanCost", "plan_cost"]


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
        Patches and model voxels the blocks compute: each block predicts the lattice patches
        whose start lies in its core, so every patch runs once.
    region_voxels
        Voxels of the blocks' regions (core plus high-side halo, clipped at the array end): what
        the blocks hold as model input.
    spill_voxels
        Voxels of Σw·pred (float64) that blocks hand to their neighbours: region minus core.
    read_voxels
        Input voxels read from storage: every voxel once. A block's halo is the low edge of its
        neighbours' input blocks, which the writer keeps in memory until they run.
    blocks
        Number of blocks.
    """

    voxels: int
    lattice_patches: int
    lattice_voxels: int
    computed_patches: int
    computed_voxels: int
    region_voxels: int
    spill_voxels: int
    read_voxels: int
    blocks: int

    @property
    def lattice_ratio(self) -> float:
        """Model voxels per output voxel of one whole-array pass (the lattice coverage)."""
        return self.lattice_voxels / self.voxels

    @property
    def computed_ratio(self) -> float:
        """Model voxels per output voxel that the blocks compute."""
        return self.computed_voxels / self.voxels

    @property
    def region_ratio(self) -> float:
        """Block-region voxels per output voxel (model input held by the blocks)."""
        return self.region_voxels / self.voxels

    @property
    def spill_ratio(self) -> float:
        """Σw·pred voxels passed between blocks per output voxel."""
        return self.spill_voxels / self.voxels

    @property
    def read_ratio(self) -> float:
        """Bytes read from storage per input byte."""
        return self.read_voxels / self.voxels


def plan_cost(plan: BlockPlan) -> PlanCost:
    """Count the model voxels, regions and reads of a block plan (pure arithmetic, no data).

    Every count factorises over the axes: the blocks form a grid and the lattice is one set of
    starts per axis, so a block owns (starts along t) x (along y) x (along x) patches, and
    summing over the grid is the product of per-axis sums. c and z contribute their lengths.

    Parameters
    ----------
    plan
        From :func:`srdvol.core.tiling.plan_blocks`.

    Returns
    -------
    PlanCost
    """
    counts = dict.fromkeys(("voxels", "lp", "lv", "cp", "cv", "region"), 1)
    for axis, (name, length) in enumerate(zip(plan.dims, plan.shape, strict=True)):
        if name not in plan.patch:
            # c and z: every plane is its own movie with the same lattice, no halo.
            counts = {key: value * length for key, value in counts.items()}
            continue
        size, depth = plan.patch[name], plan.depth[axis]
        starts = lattice(length, size, plan.stride[name])
        own = region = 0
        for lo, extent in zip(plan.starts(axis), plan.chunks[axis], strict=True):
            own += len(owned(starts, lo, lo + extent))
            region += min(lo + extent + depth, length) - lo
        counts["voxels"] *= length
        counts["lp"] *= len(starts)
        counts["lv"] *= len(starts) * size
        counts["cp"] *= own
        counts["cv"] *= own * size
        counts["region"] *= region
    return PlanCost(
        voxels=counts["voxels"],
        lattice_patches=counts["lp"],
        lattice_voxels=counts["lv"],
        computed_patches=counts["cp"],
        computed_voxels=counts["cv"],
        region_voxels=counts["region"],
        spill_voxels=counts["region"] - counts["voxels"],
        read_voxels=counts["voxels"],
        blocks=math.prod(plan.nblocks),
    )
