"""The 8 symmetries of the (y, x) plane: what training augments with and ``--tta`` averages over.

They work on numpy arrays and torch tensors of any leading shape; the network is not exactly
equivariant to them (its windows and convolutions are not), which is why averaging over them
at prediction time helps.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from srdvol.errors import ConfigError

__all__ = ["SYMMETRIES", "dihedral", "dihedral_inverse"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: How many there are: four quarter turns, each with and without a mirror.
SYMMETRIES = 8


def dihedral(patches: ArrayT, k: int) -> ArrayT:
    """Apply the ``k``-th of the 8 symmetries of the square to the (y, x) plane.

    ``k % 4`` quarter turns from the y axis towards the x axis (``rot90`` on the last two
    axes), then, for ``k >= 4``, a mirror along x. Works on numpy arrays and torch tensors
    of any leading shape. Turns by 90 or 270 degrees swap the y and x sizes.

    Raises
    ------
    ConfigError
        If ``k`` is not in 0..7.
    """
    _check_k(k)
    if isinstance(patches, torch.Tensor):
        out = torch.rot90(patches, k % 4, dims=(-2, -1))
        return torch.flip(out, dims=(-1,)) if k >= 4 else out
    out = np.rot90(patches, k % 4, axes=(-2, -1))
    return np.flip(out, axis=-1) if k >= 4 else out


def dihedral_inverse(patches: ArrayT, k: int) -> ArrayT:
    """Undo :func:`dihedral` with the same ``k``."""
    _check_k(k)
    if isinstance(patches, torch.Tensor):
        out = torch.flip(patches, dims=(-1,)) if k >= 4 else patches
        return torch.rot90(out, -(k % 4), dims=(-2, -1))
    out = np.flip(patches, axis=-1) if k >= 4 else patches
    return np.rot90(out, -(k % 4), axes=(-2, -1))


def _check_k(k: int) -> None:
    if k not in range(SYMMETRIES):
        raise ConfigError("dihedral", f"transform index {k} is not in 0..7", "pass 0 to 7")
