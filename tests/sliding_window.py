"""A whole-array sliding window written from DESIGN.md section 3, not from srdvol's code.

Tests compare srdvol's engine and its in-memory path with :func:`reference` bit for bit. Nothing
here uses srdvol's lattice, stride, window or accumulator:

- each (c, z) plane is its own (t, y, x) movie;
- per axis, stride = max(1, round(patch * (1 - overlap))); patch starts 0, s, 2s, ... below
  ``length - patch``, then ``length - patch`` (the last patch snapped to the end); an axis
  shorter than the patch is reflect-padded at its end to one patch (single start 0);
- the window is the product over t, y, x of a tent or cos² profile sampled at voxel centres
  ``c = (i + 0.5) / patch`` and given as integers (only ratios matter): the tent
  ``1 - |2c - 1|`` times the patch length, cos² ``sin²(πc)`` times 128, rounded, at least 1;
- output = Σ w·pred / Σ w, accumulated in float64 in lattice order, rounded to float32.

Every lattice patch goes to the model on its own (a batch of one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

Model = Callable[[np.ndarray], np.ndarray]


def _starts(length: int, patch: int, overlap: float) -> list[int]:
    if length <= patch:
        return [0]
    step = max(1, round(patch * (1 - overlap)))
    return [*range(0, length - patch, step), length - patch]


def _profile(patch: int, kind: str) -> np.ndarray:
    centre = (np.arange(patch) + 0.5) / patch
    if kind == "tent":
        return np.rint(patch * (1.0 - np.abs(2.0 * centre - 1.0)))
    return np.maximum(1.0, np.rint(128 * np.sin(np.pi * centre) ** 2))


def reference_movie(
    movie: np.ndarray, model: Model, patch: Sequence[int], overlap: float, kind: str = "tent"
) -> np.ndarray:
    """One (t, y, x) movie through the global sliding window, one patch at a time."""
    shape = movie.shape
    padded = np.pad(
        movie.astype(np.float32),
        [(0, max(0, p - n)) for n, p in zip(shape, patch, strict=True)],
        mode="reflect",
    )
    wt, wy, wx = (_profile(p, kind) for p in patch)
    weight = wt[:, None, None] * wy[None, :, None] * wx[None, None, :]
    num = np.zeros(padded.shape, dtype=np.float64)
    den = np.zeros(padded.shape, dtype=np.float64)
    lattice = [_starts(n, p, overlap) for n, p in zip(shape, patch, strict=True)]
    for t0, y0, x0 in itertools.product(*lattice):
        box = (slice(t0, t0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0, x0 + patch[2]))
        pred = np.asarray(model(padded[box][None]), dtype=np.float32)[0]
        num[box] += weight * pred.astype(np.float64)
        den[box] += weight
    return (num / den)[: shape[0], : shape[1], : shape[2]].astype(np.float32)


def reference(
    array: np.ndarray,
    model: Model,
    *,
    dims: str,
    patch: Sequence[int],
    overlap: float,
    kind: str = "tent",
) -> np.ndarray:
    """Every (c, z) plane of ``array`` (axes ``dims``) through :func:`reference_movie`."""
    movie_axes = [dims.index(a) for a in "tyx"]
    moved = np.moveaxis(array, movie_axes, (-3, -2, -1))
    out = np.empty(moved.shape, dtype=np.float32)
    for index in np.ndindex(moved.shape[:-3]):
        out[index] = reference_movie(moved[index], model, tuple(patch), overlap, kind)
    return np.moveaxis(out, (-3, -2, -1), movie_axes)
