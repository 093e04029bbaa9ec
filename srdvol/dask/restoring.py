"""``--restore`` on a lazy image: the network's output and the input, stretch by stretch.

:func:`restored` stacks one step on the lazy denoised array of :func:`srdvol.dask.graph.denoise`:
the input and the network's output cut into stretches of about
:data:`~srdvol.predict.restore.RESTORE_FRAMES` frames (a lattice of whole output chunks,
whatever the processing blocks), each block given a halo of
:func:`~srdvol.predict.restore.restore_halo` pixels in y and x, and
:func:`~srdvol.predict.restore.restore` run on every frame plane (each index of the axes other
than t, y, x). The tiles lie on the whole frame's lattice, so the result equals one whole-frame
pass of every stretch for any blocks. The writer (:func:`srdvol.dask.graph.write`) stores it
like the denoised array; a block's network tasks are shared with its neighbours as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from srdvol.axes import MOVIE_AXES
from srdvol.dask.writer import BlockDataError, nonfinite_count
from srdvol.predict.restore import RESTORE_FRAMES, RESTORE_RANK, restore, restore_halo

__all__ = ["restored", "stretches"]


def stretches(frames: int, chunk: int, length: int = RESTORE_FRAMES) -> tuple[int, ...]:
    """Lengths of the stretches of a recording of ``frames`` frames: whole output chunks of
    ``chunk`` frames, about ``length`` frames each; a short remainder (under half a stretch)
    joins the stretch before it."""
    step = max(1, round(length / chunk)) * chunk
    sizes = [step] * (frames // step)
    rest = frames - sum(sizes)
    if rest:
        if sizes and rest < step / 2:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes)


def _at_least(sizes: Sequence[int], least: int) -> tuple[int, ...]:
    """``sizes`` with neighbours merged until every piece holds ``least`` (or all of them)."""
    merged: list[int] = []
    for size in sizes:
        if merged and merged[-1] < least:
            merged[-1] += size
        else:
            merged.append(size)
    if len(merged) > 1 and merged[-1] < least:
        last = merged.pop()
        merged[-1] += last
    return tuple(merged)


def restored(
    image: da.Array,
    denoised: da.Array,
    *,
    dims: Sequence[str],
    scale: float,
    chunks: Sequence[int],
    rank: int = RESTORE_RANK,
) -> da.Array:
    """The restored image, lazy (see :mod:`srdvol.predict.restore`).

    Parameters
    ----------
    image
        The input, a dask array.
    denoised
        The network's output for it (``--anchor 0``, no ``--guide``), same shape.
    dims
        Axis names of both, e.g. ``("t", "y", "x")``.
    scale
        The data's unit of intensity (the model's normalisation std).
    chunks
        The output's chunk (or shard) shape: stretches and blocks are made of whole ones.
    rank
        Activity patterns per tile.

    Returns
    -------
    dask.array.Array
        float32, chunked in stretches along t and in the denoised array's blocks (merged to
        hold a halo) along y and x.
    """
    names = list(dims)
    t, y, x = (names.index(a) for a in MOVIE_AXES)
    halo = restore_halo()
    block = list(denoised.chunks)
    block[t] = stretches(image.shape[t], int(chunks[t]))
    for a in (y, x):
        block[a] = _at_least(denoised.chunks[a], halo)
    # plain tasks, never distributed's P2P rechunk (see srdvol.dask.graph)
    noisy = image.rechunk(tuple(block), method="tasks")
    network = denoised.rechunk(tuple(block), method="tasks")
    token = dask.base.tokenize(noisy.name, network.name, scale, rank)
    return da.map_overlap(
        _restore_block,
        noisy,
        network,
        # an axis in one block (a frame smaller than the halo) needs none
        depth={a: (halo if a in (y, x) and len(block[a]) > 1 else 0) for a in range(len(names))},
        boundary="none",
        trim=False,  # the block function crops its halo itself
        chunks=tuple(block),
        dtype=np.float32,
        meta=np.empty((0,) * len(names), dtype=np.float32),
        allow_rechunk=False,
        name=f"srdvol-restore-{token}",
        movie=(t, y, x),
        chunks_of=tuple(block),
        shape=tuple(image.shape),
        halo=halo,
        scale=float(scale),
        rank=int(rank),
        dims=tuple(names),
    )


def _restore_block(
    noisy: np.ndarray,
    network: np.ndarray,
    *,
    movie: tuple[int, int, int],
    chunks_of: tuple[tuple[int, ...], ...],
    shape: tuple[int, ...],
    halo: int,
    scale: float,
    rank: int,
    dims: tuple[str, ...],
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    if block_info is None:  # dask passes it to every function that accepts it
        raise RuntimeError("map_overlap gave no block_info")
    location = block_info[0]["chunk-location"]
    starts = [int(sum(chunks_of[a][:i])) for a, i in enumerate(location)]
    stops = [s + chunks_of[a][i] for a, (s, i) in enumerate(zip(starts, location, strict=True))]
    _, y, x = movie
    low = {a: starts[a] - max(0, starts[a] - halo) if len(chunks_of[a]) > 1 else 0 for a in (y, x)}
    a_noisy = np.moveaxis(noisy, movie, (-3, -2, -1))
    a_network = np.moveaxis(network, movie, (-3, -2, -1))
    origin = (starts[y] - low[y], starts[x] - low[x])
    core = (
        slice(low[y], low[y] + stops[y] - starts[y]),
        slice(low[x], low[x] + stops[x] - starts[x]),
    )
    core_shape = (stops[y] - starts[y], stops[x] - starts[x])
    out = np.empty((*a_network.shape[:-2], *core_shape), np.float32)
    for idx in np.ndindex(a_network.shape[:-3]):
        plane = restore(
            a_noisy[idx],
            a_network[idx],
            scale=scale,
            rank=rank,
            origin=origin,
            frame=(shape[y], shape[x]),
        )
        out[idx] = plane[:, core[0], core[1]]
    bad = nonfinite_count(out)  # never write NaN/Inf and report success
    if bad:
        span = ", ".join(
            f"{name}={start}:{stop}" for name, start, stop in zip(dims, starts, stops, strict=True)
        )
        raise BlockDataError(
            f"restore block {tuple(int(i) for i in location)} ({span})",
            f"--restore gave {bad} NaN or Inf value(s) from a finite input and network output",
            "run without --restore (or with --anchor) and report this; nothing of this block "
            "was written",
        )
    return np.moveaxis(out, (-3, -2, -1), movie)
