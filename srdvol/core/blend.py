"""The division that ends overlap-add blending: Σw·pred / Σw.

Blocks add their weighted predictions ``Σ w·pred`` (float64) where they fall, their own and the
ones their lower neighbours spill into them; the weight sum ``Σ w`` needs no data. The lattice is
a product of one set of starts per axis and the window a product of one profile per axis, so
``Σ w`` is the product of one per-axis sum (:func:`weight_sums`), a small integer, exact in
float64, and equal to what adding every patch's 3-D window would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srdvol.core.tiling import Window, lattice, window_1d

__all__ = ["divide", "weight_sums"]


def weight_sums(
    length: int, patch: int, step: int, kind: Window | str, lo: int = 0, hi: int | None = None
) -> np.ndarray:
    """``Σ w`` along one axis at positions ``lo..hi`` (default: the whole axis).

    Parameters
    ----------
    length
        Axis length. An axis shorter than the patch has the one patch at 0 (reflect-padded).
    patch, step
        Patch length and lattice stride along the axis.
    kind
        The window.
    lo, hi
        The positions to return.

    Returns
    -------
    numpy.ndarray
        float64 sums of the window weights of every lattice patch covering each position.
    """
    hi = length if hi is None else hi
    profile = window_1d(patch, kind)
    total = np.zeros(max(length, patch), dtype=np.float64)
    for start in lattice(length, patch, step):
        total[start : start + patch] += profile
    return total[lo:hi]


def divide(num: np.ndarray, sums: Sequence[np.ndarray]) -> np.ndarray:
    """``num / Σw`` as float32, with ``Σw`` the outer product of the per-axis ``sums``.

    ``sums`` belong to the last ``len(sums)`` axes of ``num`` (leading axes broadcast). Each
    weight sum is formed whole (an exact integer) and divided once, as a whole-array pass that
    added the 3-D windows would: dividing axis by axis rounds differently. The work goes slab by
    slab along the first of those axes, so no temporary is larger than one slab.

    Raises
    ------
    RuntimeError
        If a weight sum is not positive (a tiling bug, never a user error).
    """
    for s in sums:
        if not np.all(s > 0):
            raise RuntimeError(f"{int(np.count_nonzero(s <= 0))} position(s) covered by no patch")
    lead = num.ndim - len(sums)
    rest = np.ones((), dtype=np.float64)
    for s in sums[1:]:
        rest = np.multiply.outer(rest, s)
    out = np.empty(num.shape, dtype=np.float32)
    den = np.empty(rest.shape, dtype=np.float64)
    for index in np.ndindex(num.shape[:lead]):
        for i, first in enumerate(sums[0]):
            np.multiply(rest, first, out=den)  # exact: small integers
            np.divide(num[(*index, i)], den, out=den)
            out[(*index, i)] = den  # rounded to float32 once
    return out
