"""Random training patches read lazily from the image store.

Training never loads the whole array: each patch is one small slice of the lazy (dask over zarr)
array, so only the storage chunks that the patch touches are read. Positions are drawn
**uniformly** — any (c, z) movie, any integer start along t, y and x — rather than on the
inference lattice: uniform starts show the network every phase of the image relative to the patch
grid and every frame equally often, and a patch that straddles chunk borders only costs reading
those few chunks.

With ``read_ahead`` (training's setting) the next batch is read in a background thread while the
current step trains: storage is read whole chunks at a time, so a patch of 64 frames of a
recording stored one frame per chunk decompresses 64 whole frames, which the step would
otherwise wait for. The positions are drawn in the same order either way (on the calling
thread), so the patches, and a seed's result, do not change.

Each rank of a distributed run draws from its own stream, ``SeedSequence(seed, spawn_key=(rank,))``,
so ranks see different patches and a run is reproducible for a seed and world size. The stream's
state is part of :meth:`PatchSampler.state_dict`, which training checkpoints store, so a resumed run
draws exactly the patches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from srdvol.axes import MOVIE_AXES, PARTITION_AXES
from srdvol.errors import ConfigError, InputError, flag
from srdvol.options import Patch

__all__ = ["PatchSampler"]


@dataclass
class _Ahead:
    """A batch being read ahead: its size, the stream's state before its draws, its blocks."""

    count: int
    state: dict[str, Any]
    blocks: Future[tuple[Any, ...]]


def _source(array: xr.DataArray) -> str:
    return str(array.attrs.get("source") or array.name or "input array")


class PatchSampler:
    """Draw random (t, y, x) patches from every (c, z) movie of a lazy image.

    Parameters
    ----------
    array
        The image, dims a subset of t, c, z, y, x including t, y and x, backed by a dask array
        (as :func:`srdvol.ngff.read.open_image` returns it) or by a numpy array.
    patch
        Patch size ``(t, y, x)``. A y or x axis shorter than the patch is reflect-padded; a t
        axis shorter than the patch is an error.
    seed
        Seed of the position stream.
    rank, world_size
        This process's rank among ``world_size`` training processes; each rank has its own stream.
    batch_size
        Number of patches :meth:`sample` (and iteration) returns at once.
    read_ahead
        Read the next batch in a background thread as soon as :meth:`sample` returns one (the
        same patches, drawn in the same order; :meth:`state_dict` is the state after the
        batches returned). :meth:`close` ends the thread.

    Raises
    ------
    InputError
        If the movie has fewer frames than ``patch[0]`` or lacks a t, y or x axis.
    ConfigError
        If ``patch``, ``rank``, ``world_size`` or ``batch_size`` is not valid.

    Examples
    --------
    >>> sampler = PatchSampler(image, patch=(32, 64, 64), seed=0, batch_size=4)  # doctest: +SKIP
    >>> batch = next(iter(sampler))  # float32, shape (4, 32, 64, 64)          # doctest: +SKIP
    """

    def __init__(
        self,
        array: xr.DataArray,
        *,
        patch: tuple[int, int, int],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        read_ahead: bool = False,
    ) -> None:
        patch = Patch.parse(patch)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                "rank", f"rank {rank} is not in a world of {world_size}", "use 0 <= rank < size"
            )
        if batch_size < 1:
            raise ConfigError(flag("batch_size"), f"{batch_size} is not positive", "give 1 or more")
        dims = tuple(str(d) for d in array.dims)
        missing = [d for d in MOVIE_AXES if d not in dims]
        if missing:
            raise InputError(
                _source(array),
                f"the image has no {' or '.join(missing)} axis (dims {''.join(dims)})",
                f"open it with its axes named, for example {flag('axes')} tzyx",
            )
        frames = int(array.sizes["t"])
        if frames < patch[0]:
            raise InputError(
                _source(array),
                f"the movie has {frames} frames, fewer than the patch's {patch[0]}",
                "use a smaller patch_t (a multiple of 16) or a longer recording",
            )
        self.array = array
        self.patch: tuple[int, int, int] = patch  # type: ignore[assignment]
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = int(batch_size)
        self._dims = dims
        self._data = array.data if isinstance(array.data, da.Array) else da.from_array(array.data)
        partition = [d for d in dims if d in PARTITION_AXES]
        #: One entry per (c, z) movie: a mapping from partition dim to index.
        self.movies: list[dict[str, int]] = [
            dict(zip(partition, combo, strict=True))
            for combo in itertools.product(*(range(array.sizes[d]) for d in partition))
        ]
        self._shape = {d: int(array.sizes[d]) for d in MOVIE_AXES}
        self._rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(rank,)))
        self.read_ahead = bool(read_ahead)
        self._ahead: _Ahead | None = None
        self._reader: ThreadPoolExecutor | None = None

    # -- positions -----------------------------------------------------------------------------
    def draw(self) -> tuple[dict[str, int], tuple[int, int, int]]:
        """Draw one patch position: the (c, z) movie and the (t, y, x) start (pre-padding)."""
        self._drop_ahead()  # the batch read ahead gives its positions back to the stream
        return self._draw()

    def _draw(self) -> tuple[dict[str, int], tuple[int, int, int]]:
        movie = self.movies[int(self._rng.integers(len(self.movies)))]
        start = tuple(
            int(self._rng.integers(max(self._shape[d] - p, 0) + 1))
            for d, p in zip(MOVIE_AXES, self.patch, strict=True)
        )
        return movie, start  # type: ignore[return-value]

    def region(self, movie: dict[str, int], start: tuple[int, int, int]) -> tuple[slice | int, ...]:
        """Return the index into the stored array that holds the patch at ``start``."""
        spans = {
            d: slice(s, min(s + p, self._shape[d]))
            for d, s, p in zip(MOVIE_AXES, start, self.patch, strict=True)
        }
        return tuple(movie[d] if d in movie else spans[d] for d in self._dims)

    # -- reading -------------------------------------------------------------------------------
    def read(self, movie: dict[str, int], start: tuple[int, int, int]) -> np.ndarray:
        """Read one patch as float32 ``(t, y, x)``, reflect-padding short y or x axes."""
        return self._finish(np.asarray(self._data[self.region(movie, start)].compute()))

    def _finish(self, block: np.ndarray) -> np.ndarray:
        kept = [d for d in self._dims if d in MOVIE_AXES]
        block = np.transpose(block, [kept.index(d) for d in MOVIE_AXES]).astype(np.float32)
        pads = [(0, p - n) for p, n in zip(self.patch, block.shape, strict=True)]
        for axis, (_, pad) in enumerate(pads):
            if pad:
                axis_pad = [(0, 0)] * 3
                axis_pad[axis] = (0, pad)
                # A single-pixel axis cannot be mirrored; repeat it instead.
                mode = "reflect" if block.shape[axis] > 1 else "edge"
                block = np.pad(block, axis_pad, mode=mode)  # type: ignore[call-overload]
        return np.ascontiguousarray(block)

    def sample(self, batch_size: int | None = None) -> np.ndarray:
        """Draw and read a batch of patches: float32 ``(B, t, y, x)`` in input units."""
        count = self.batch_size if batch_size is None else int(batch_size)
        if self._ahead is not None and self._ahead.count != count:
            self._drop_ahead()  # drawn again, at this size
        ahead, self._ahead = self._ahead, None
        blocks = ahead.blocks.result() if ahead is not None else self._read(self._regions(count))
        if self.read_ahead:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="srdvol-read-ahead")
            state = self._rng.bit_generator.state
            regions = self._regions(count)
            self._ahead = _Ahead(count, state, self._reader.submit(self._read, regions))
        return np.stack([self._finish(np.asarray(b)) for b in blocks])

    def _regions(self, count: int) -> list[tuple[slice | int, ...]]:
        return [self.region(*self._draw()) for _ in range(count)]

    def _read(self, regions: list[tuple[slice | int, ...]]) -> tuple[Any, ...]:
        # One compute for the batch so the chunk reads run in parallel threads; explicit
        # threads keep it off any distributed client (this may run inside a Dask worker).
        return dask.compute(*(self._data[r] for r in regions), scheduler="threads")

    def _drop_ahead(self) -> None:
        """Forget the batch read ahead, its positions given back to the stream."""
        if self._ahead is not None:
            self._rng.bit_generator.state = self._ahead.state
            self._ahead.blocks.cancel()
            self._ahead = None

    def close(self) -> None:
        """Stop reading ahead (the stream stays where the returned batches left it)."""
        self._drop_ahead()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.sample()

    @property
    def nbytes_per_patch(self) -> int:
        """Bytes of one float32 patch."""
        return 4 * math.prod(self.patch)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the position stream's state (JSON-ready), for training checkpoints."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "bit_generator": (
                self._ahead.state if self._ahead is not None else self._rng.bit_generator.state
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position stream saved by :meth:`state_dict`."""
        if int(state["rank"]) != self.rank or int(state["world_size"]) != self.world_size:
            raise ConfigError(
                "resume",
                f"the saved sampler state is for rank {state['rank']} of {state['world_size']}, "
                f"not rank {self.rank} of {self.world_size}",
                "resume with the same number of training processes",
            )
        self._drop_ahead()
        self._rng.bit_generator.state = state["bit_generator"]
