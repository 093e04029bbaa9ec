"""Global intensity statistics: computed once from a deterministic sample of storage chunks.

The network sees ``(x - mean) / std`` and its output is mapped back with ``y * std + mean``,
so the denoised image comes out in the input's intensity units. The statistics are global —
one mean and one standard deviation for the whole image — because per-block statistics make
the baseline jump from one block to the next (DeepCAD-RT issue #33). Dividing by the standard
deviation (upstream only subtracts the mean) makes the network's input scale independent of the
detector gain, so one learning rate suits 8-bit and 16-bit data alike.

The sample is a fixed, seed-determined subset of whole storage chunks spread over time and over
the (c, z) planes, limited to ``max_bytes`` of float data, so the statistics of a terabyte image
cost seconds and the same image always gives the same numbers. The sample is also where bad data
(NaN, Inf, a constant image) is caught before anything is trained or written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from srdvol.errors import ConfigError, DataError

__all__ = [
    "Statistics",
    "chunk_grid",
    "compare_statistics",
    "denormalize",
    "normalize",
    "sample_statistics",
]

#: How far an input's statistics may lie from a model's training statistics without a
#: warning, in the units the network sees: the mean within this many training standard
#: deviations, the standard deviation within this factor.
SHIFT_LIMIT = 1.0
SCALE_LIMIT = 2.0

#: Default sample size: 256 MiB of float64 values, seconds to read from a local disk.
DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Statistics:
    """Global intensity statistics of one image, stored with the model.

    Attributes
    ----------
    mean
        Mean intensity of the sample, in input units.
    std
        Standard deviation of the sample, in input units (> 0).
    count
        Number of values the statistics were computed from.
    chunks
        Number of storage chunks read.
    """

    mean: float
    std: float
    count: int = 0
    chunks: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary (the form stored in a model record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Statistics:
        """Rebuild statistics from :meth:`to_dict` output (unknown keys are ignored)."""
        return cls(
            mean=float(data["mean"]),
            std=float(data["std"]),
            count=int(data.get("count", 0)),
            chunks=int(data.get("chunks", 0)),
        )


def normalize(x: np.ndarray, stats: Statistics) -> np.ndarray:
    """Map raw intensities to what the network sees: ``(x - mean) / std`` as float32."""
    out = np.asarray(x, dtype=np.float32) - np.float32(stats.mean)
    out /= np.float32(stats.std)
    return out


def denormalize(y: np.ndarray, stats: Statistics) -> np.ndarray:
    """Map network output back to input intensity units: ``y * std + mean`` as float32."""
    out = np.asarray(y, dtype=np.float32) * np.float32(stats.std)
    out += np.float32(stats.mean)
    return out


def compare_statistics(
    sample: Statistics, trained: Statistics, *, subject: str | None = None
) -> str | None:
    """Say when an input's intensities are far from those a model was trained on.

    The network was trained on ``(x - mean) / std`` of its training data, so it saw inputs of
    mean 0 and standard deviation 1, and its filters are not shift- or scale-invariant: an
    input whose normalised mean lies more than :data:`SHIFT_LIMIT` from 0 (more than one
    training standard deviation away, where the bulk of the training intensities ends), or
    whose spread differs by more than :data:`SCALE_LIMIT` times, is outside what the model
    learned, and the output shifts (a uint8 recording of mean 51 came out at 73).

    Returns
    -------
    str or None
        A one-sentence warning naming both figures and the choice, or ``None``.
    """
    shift = (sample.mean - trained.mean) / trained.std
    ratio = sample.std / trained.std
    if abs(shift) <= SHIFT_LIMIT and 1 / SCALE_LIMIT <= ratio <= SCALE_LIMIT:
        return None
    head = f"{subject}: " if subject else ""
    return (
        f"{head}the input's intensities (mean {sample.mean:.4g}, std {sample.std:.4g}) are far "
        f"from the model's training data (mean {trained.mean:.4g}, std {trained.std:.4g}: "
        f"{shift:+.1f} training std apart, {ratio:.2g}x the spread), so the output may be "
        "shifted; retrain on this data (srdvol train, or srdvol denoise without [[model]]) for a "
        "faithful result, or pass [[renormalize]] to normalise it with its own statistics"
    )


def chunk_grid(array: xr.DataArray) -> tuple[tuple[int, ...], ...]:
    """Return the chunk sizes per dim of ``array`` (its dask chunks, else its storage chunks)."""
    data = array.data
    if isinstance(data, da.Array):
        return tuple(tuple(int(c) for c in chunks) for chunks in data.chunks)
    store_chunks = array.attrs.get("store_chunks") or {}
    grid = []
    for dim, size in zip(array.dims, array.shape, strict=True):
        step = max(1, int(store_chunks.get(dim, size)))
        grid.append(tuple(min(step, size - s) for s in range(0, size, step)))
    return tuple(grid)


def _subject(array: xr.DataArray) -> str:
    return str(array.attrs.get("source") or array.name or "input array")


def _choose_chunks(
    nchunks: Sequence[int], dims: Sequence[str], n: int, seed: int
) -> list[tuple[int, ...]]:
    """Pick ``n`` distinct chunk indices: evenly spread over t, cycling over (c, z) planes.

    The t index is stratified (chunk ``i`` gets time row ``i * nt // n``), the (c, z) plane cycles
    through a seeded permutation so every plane is visited before any repeats, and the (y, x)
    chunk is drawn at random. The total grid is never enumerated (a terabyte has ~1e6 chunks).
    """
    rng = np.random.default_rng(seed)
    t_axis = dims.index("t")
    plane_axes = [i for i, d in enumerate(dims) if d in ("c", "z")]
    other_axes = [i for i in range(len(dims)) if i != t_axis and i not in plane_axes]
    nt = nchunks[t_axis]
    nplanes = math.prod(nchunks[i] for i in plane_axes)
    plane_order = rng.permutation(nplanes) if nplanes > 1 else np.zeros(1, dtype=np.int64)
    chosen: dict[tuple[int, ...], None] = {}
    attempts = 0
    while len(chosen) < n and attempts < 20 * n:
        i = attempts
        attempts += 1
        index = [0] * len(dims)
        index[t_axis] = (i % n) * nt // n if attempts <= n else int(rng.integers(nt))
        plane = int(plane_order[i % nplanes])
        for axis in reversed(plane_axes):
            index[axis] = plane % nchunks[axis]
            plane //= nchunks[axis]
        for axis in other_axes:
            index[axis] = int(rng.integers(nchunks[axis]))
        chosen.setdefault(tuple(index), None)
    return sorted(chosen)


def sample_statistics(
    array: xr.DataArray, *, max_bytes: int = DEFAULT_MAX_BYTES, seed: int = 0
) -> Statistics:
    """Compute global mean and standard deviation from a deterministic sample of chunks.

    Parameters
    ----------
    array
        The image as a lazy labelled array (dims a subset of t, c, z, y, x including t), as
        :func:`srdvol.ngff.read.open_image` returns it; its dask chunks should be the storage
        chunks.
    max_bytes
        Upper bound on the sample, counted as float64 values held at once. At least one chunk
        (or part of one, cut along t, when a single chunk is larger) is always read.
    seed
        Picks the chunks; the same image and seed give the same statistics.

    Returns
    -------
    Statistics
        Mean and standard deviation in input units, with the number of values and chunks used.

    Raises
    ------
    DataError
        If a sampled chunk holds NaN or Inf (the message names the store and the chunk), or if
        the sample is constant (standard deviation 0).
    ConfigError
        If ``max_bytes`` is not positive.
    """
    if max_bytes <= 0:
        raise ConfigError("max_bytes", f"must be positive, got {max_bytes}", "pass a byte count")
    dims = [str(d) for d in array.dims]
    if "t" not in dims:
        raise DataError(_subject(array), "the image has no t axis", "pass a time series")
    grid = chunk_grid(array)
    nchunks = [len(g) for g in grid]
    chunk_values = max(math.prod(max(g) for g in grid), 1)
    n = max(1, min(max_bytes // (8 * chunk_values), math.prod(nchunks)))
    indices = _choose_chunks(nchunks, dims, n, seed)
    offsets = [np.concatenate([[0], np.cumsum(g)]) for g in grid]

    regions = []
    for index in indices:
        region = {
            dim: slice(int(offsets[a][i]), int(offsets[a][i + 1]))
            for a, (dim, i) in enumerate(zip(dims, index, strict=True))
        }
        region["t"] = _fit_frames(region, max_bytes)
        regions.append(region)
    data = array.data if isinstance(array.data, da.Array) else da.from_array(array.data)
    pieces = [data[tuple(r[d] for d in dims)] for r in regions]
    # Threads overlap the reads; the sample is small, so it never needs a cluster.
    values = dask.compute(*pieces, scheduler="threads")

    total, mean, m2 = 0, 0.0, 0.0
    for region, block in zip(regions, values, strict=True):
        block = np.asarray(block, dtype=np.float64)
        if not np.isfinite(block).all():
            bad = int(np.size(block) - np.count_nonzero(np.isfinite(block)))
            where = ", ".join(f"{d}={s.start}:{s.stop}" for d, s in region.items())
            raise DataError(
                _subject(array),
                f"{bad} NaN or Inf value(s) in the chunk at {where}",
                "replace or mask the non-finite values (for example with 0 or the local median) "
                "and write a cleaned copy before denoising",
            )
        count = block.size
        if count == 0:
            continue
        block_mean = float(block.mean())
        block_m2 = float(((block - block_mean) ** 2).sum())
        # Chan et al. pairwise combination: exact and stable in float64.
        delta = block_mean - mean
        new_total = total + count
        mean += delta * count / new_total
        m2 += block_m2 + delta * delta * total * count / new_total
        total = new_total
    std = math.sqrt(m2 / total) if total else 0.0
    if not std > 0.0 or not math.isfinite(std):
        raise DataError(
            _subject(array),
            f"the sampled data is constant (every value {mean:g}), so there is no signal or noise "
            "to learn from",
            "check that the right array, level and channel were opened",
        )
    return Statistics(mean=mean, std=std, count=total, chunks=len(regions))


def _fit_frames(region: dict[str, slice], max_bytes: int) -> slice:
    """Cut a chunk's time range so that one chunk alone stays within ``max_bytes``."""
    frames = region["t"]
    plane = math.prod((s.stop - s.start) for d, s in region.items() if d != "t") or 1
    limit = max(1, max_bytes // (8 * plane))
    if frames.stop - frames.start <= limit:
        return frames
    return slice(frames.start, frames.start + limit)
