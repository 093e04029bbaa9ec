"""Chunk reads that name the chunk they fail on.

The reader dask uses for an input level: :class:`NamedReads` wraps the read-only Zarr array so
that a damaged or truncated chunk is reported as a :class:`~srdvol.errors.DataError` naming the
chunk's file and its region, in the client or on any Dask worker. Importing this module installs
srdvol's checked Blosc decoders (:func:`srdvol.ngff.blosc.install`), so every process that reads
through it (workers unpickle it) decodes only complete chunks.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import zarr

from srdvol.errors import DataError, SrdvolError
from srdvol.ngff import blosc

__all__ = ["NamedReads"]

blosc.install()  # a truncated chunk fails every read instead of decoding stray memory


class NamedReads:
    """The level array as dask reads it: a failed chunk read names the chunk.

    zarr reports a damaged chunk without saying which one (``error during blosc
    decompression: -1``, ``cannot reshape array of size ...``); this wrapper turns such an error
    into a :class:`~srdvol.errors.DataError` whose subject is the chunk's store path and whose
    problem gives its region in array coordinates. It is picklable (Dask workers read through
    it, and the error travels back to the client).

    Parameters
    ----------
    array
        The Zarr array, opened read-only.
    location
        Its path or URL (store path plus the array's path inside it).
    dims
        Axis names, for the region.
    """

    def __init__(self, array: zarr.Array, *, location: str, dims: tuple[str, ...]) -> None:
        self.array = array
        self.location = location
        self.dims = tuple(dims)
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return ("srdvol-read", self.location, self.shape, str(self.dtype), self._chunk_shape())

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except (SrdvolError, MemoryError):
            raise
        except Exception as exc:
            from srdvol.ngff.remote import remote_error

            # a lost connection or expired credentials: the store, not this chunk, is the problem
            remote = remote_error(self.location, exc, then="run the same command again")
            if remote is not None:
                raise remote from None
            raise self._named(key, exc) from None

    def _chunk_shape(self) -> tuple[int, ...]:
        return tuple(int(c) for c in (getattr(self.array, "shards", None) or self.array.chunks))

    def _named(self, key: Any, exc: Exception) -> DataError:
        """Find the chunk(s) of ``key`` that fail and describe the first one."""
        chunk = self._chunk_shape()
        spans = []
        for part, size, c in zip(_as_slices(key, self.ndim), self.shape, chunk, strict=True):
            start, stop, _ = part.indices(size)
            spans.append(range(start // c, max(start // c + 1, -(-stop // c))))
        failing, error = None, exc
        for index in itertools.product(*spans):
            region = tuple(
                slice(i * c, min((i + 1) * c, n))
                for i, c, n in zip(index, chunk, self.shape, strict=True)
            )
            try:
                self.array[region]
            except Exception as inner:  # the one that fails
                failing, error = index, inner
                break
        detail = f"{type(error).__name__}: {error}"
        if failing is None:
            where = ", ".join(
                f"{d}={p.indices(n)[0]}:{p.indices(n)[1]}"
                for d, p, n in zip(self.dims, _as_slices(key, self.ndim), self.shape, strict=True)
            )
            return DataError(
                self.location,
                f"the region {where} cannot be read ({detail})",
                "check the store and its metadata, or restore the image from a good copy",
            )
        where = ", ".join(
            f"{d}={i * c}:{min((i + 1) * c, n)}"
            for d, i, c, n in zip(self.dims, failing, chunk, self.shape, strict=True)
        )
        subject = f"{self.location.rstrip('/')}/{self.array.metadata.encode_chunk_key(failing)}"
        if isinstance(error, ValueError) and "reshape" in str(error):
            problem = (
                f"the chunk at {where} does not fit the chunk shape {chunk} that the array "
                f"metadata gives ({detail})"
            )
            fix = "correct chunk_shape (and shape) in the array's metadata, or restore the image"
        else:
            problem = f"the chunk at {where} cannot be read or decoded ({detail})"
            fix = (
                "restore this chunk from a good copy of the image (a truncated or damaged "
                "file), then run the same command again"
            )
        return DataError(subject, problem, fix)


def _as_slices(key: Any, ndim: int) -> tuple[slice, ...]:
    """Dask reads with a tuple of slices; normalise to one slice per axis."""
    parts = key if isinstance(key, tuple) else (key,)
    out = [p if isinstance(p, slice) else slice(int(p), int(p) + 1) for p in parts]
    return (*out, *[slice(None)] * (ndim - len(out)))
