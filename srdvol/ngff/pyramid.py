"""The viewing pyramid of an output: levels ``s1, s2, ...``, each a 2x2 mean of the previous.

Level k has scale ``scale0 * 2**k`` in y and x, and its translation shifted by half the pooled
extent, ``(2**k - 1) / 2 * scale0``, so pixel centres stay in place. Levels are added until the
larger side of a plane is at most :data:`PYRAMID_MIN_SIZE` pixels. Each level is computed from
the previous one with dask, every task writing exactly one chunk-aligned block, and the
multiscales metadata is rewritten once all levels exist.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from srdvol.ngff.metadata import level_transform, read_multiscale

__all__ = [
    "PYRAMID_MIN_SIZE",
    "level_datasets",
    "level_path",
    "output_nbytes",
    "pyramid_shapes",
    "write_pyramid",
]


def level_path(level: int) -> str:
    """The array path of a level: ``s0``, ``s1``, ..."""
    return f"s{level}"


def level_datasets(
    axes: Sequence[str],
    *,
    scale: Sequence[float],
    translation: Sequence[float],
    levels: int,
) -> list[tuple[str, list[float], list[float]]]:
    """``(path, scale, translation)`` of levels ``0 .. levels-1`` of a 2x y/x pyramid.

    Parameters
    ----------
    axes
        Axis names in storage order.
    scale, translation
        Level 0's transform, per axis.
    levels
        How many levels.
    """
    datasets = []
    for k in range(levels):
        factor = [2.0**k if a in ("y", "x") else 1.0 for a in axes]
        level_scale = [s * f for s, f in zip(scale, factor, strict=True)]
        shift = [
            t + (f - 1.0) / 2.0 * s for t, f, s in zip(translation, factor, scale, strict=True)
        ]
        datasets.append((level_path(k), level_scale, shift))
    return datasets


def _halve_mean(block: np.ndarray, *, y: int, x: int, out_dtype: np.dtype[Any]) -> np.ndarray:
    """2x2 mean over axes ``y`` and ``x``; an odd edge row/column is averaged with itself."""
    pad = [(0, 0)] * block.ndim
    pad[y] = (0, block.shape[y] % 2)
    pad[x] = (0, block.shape[x] % 2)
    work = np.pad(block.astype(np.float64), pad, mode="edge")
    shape: list[int] = []
    pooled: list[int] = []
    for axis, n in enumerate(work.shape):
        if axis in (y, x):
            shape.extend((n // 2, 2))
            pooled.append(len(shape) - 1)
        else:
            shape.append(n)
    pooled_axes = tuple(pooled)
    mean = work.reshape(shape).mean(axis=pooled_axes)
    if np.dtype(out_dtype).kind in "iu":
        info = np.iinfo(out_dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(out_dtype)


#: Pyramid levels are added until the larger side of a plane is at most this many pixels, so a
#: frame of 65-128 px still gets a second level (viewers and tools look for one), and the
#: smallest level of any image is 33-64 px across.
PYRAMID_MIN_SIZE = 64


def output_nbytes(shape: Sequence[int], dims: Sequence[Any], dtype: Any) -> int:
    """Uncompressed bytes of an output image: level 0 plus the pyramid levels
    :func:`write_pyramid` adds (down to :data:`PYRAMID_MIN_SIZE`)."""
    axes = tuple(str(d) for d in dims)
    itemsize = np.dtype(dtype).itemsize
    levels = [tuple(int(n) for n in shape), *pyramid_shapes(tuple(shape), axes)]
    return sum(itemsize * math.prod(level) for level in levels)


def pyramid_shapes(
    shape: tuple[int, ...], axes: tuple[str, ...], *, min_size: int = PYRAMID_MIN_SIZE
) -> list[tuple[int, ...]]:
    """Shapes of levels 1, 2, ...: halve y and x (rounding up) until the plane fits ``min_size``.

    :func:`write_pyramid` writes exactly these levels (``srdvol info`` lists them in advance).
    """
    iy, ix = axes.index("y"), axes.index("x")
    shapes = []
    current = list(shape)
    while max(current[iy], current[ix]) > min_size and min(current[iy], current[ix]) > 1:
        current = list(current)
        current[iy] = math.ceil(current[iy] / 2)
        current[ix] = math.ceil(current[ix] / 2)
        shapes.append(tuple(current))
    return shapes


def write_pyramid(
    path: str | os.PathLike[str], *, client: Any = None, min_size: int = PYRAMID_MIN_SIZE
) -> list[str]:
    """Add levels ``s1, s2, ...`` (2x2 mean in y and x) to an output image, then its metadata.

    Each level is computed from the previous one with dask; every task reads a block of the
    previous level and writes exactly one chunk-aligned block of the new level, so workers never
    write the same chunk. Levels stop once the larger of y and x is at most ``min_size``. Run it
    again to rebuild the pyramid (existing levels above 0 are replaced).

    Parameters
    ----------
    path
        The output image (created by :func:`create_output`, level 0 written).
    client
        A ``distributed.Client`` to run on; ``None`` uses the current dask scheduler.
    min_size
        Stop when the plane's larger side is at most this many pixels.

    Returns
    -------
    list of str
        Paths of all levels, ``["s0", "s1", ...]``.
    """
    target = os.fspath(path)
    group = zarr.open_group(target, mode="r+")
    fmt, multiscale = read_multiscale(group, target)
    axes = tuple(str(axis.name) for axis in multiscale.axes)
    base = group[multiscale.datasets[0].path]
    iy, ix = axes.index("y"), axes.index("x")
    previous = base
    paths = [level_path(0)]
    for k, shape in enumerate(pyramid_shapes(base.shape, axes, min_size=min_size), start=1):
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, shape, strict=True))
        level = group.create_array(
            level_path(k),
            shape=shape,
            chunks=chunks,
            dtype=base.dtype,
            fill_value=0,
            overwrite=True,
            compressors=base.compressors,  # the codec (and level) of s0
            **fmt.layout_kwargs(axes),
        )
        # Read the previous level in blocks of twice the new chunk in y and x: one task, one chunk.
        read = tuple(2 * c if axis in (iy, ix) else c for axis, c in enumerate(chunks))
        source = da.from_zarr(previous, chunks=read)
        out_chunks = tuple(
            tuple(math.ceil(n / 2) for n in sizes) if axis in (iy, ix) else sizes
            for axis, sizes in enumerate(source.chunks)
        )
        halved = source.map_blocks(
            _halve_mean,
            y=iy,
            x=ix,
            out_dtype=base.dtype,
            dtype=base.dtype,
            chunks=out_chunks,
            meta=np.empty((0,) * len(shape), base.dtype),
        )
        stored = da.store(halved, level, lock=False, compute=False)
        if client is not None:
            client.compute(stored).result()
        else:
            stored.compute()
        previous = level
        paths.append(level_path(k))
    scale, translation = level_transform(multiscale)
    updated = fmt.new_multiscale(
        axes=[(str(a.name), str(a.type), a.unit) for a in multiscale.axes],
        datasets=level_datasets(axes, scale=scale, translation=translation, levels=len(paths)),
        name=str(multiscale.name or "denoised"),
    )
    fmt.write_image(group, updated)
    for stale in sorted(set(group.array_keys()) - set(paths)):
        if stale.startswith("s") and stale[1:].isdigit():
            del group[stale]
    return paths
