"""Blosc chunks are checked for truncation before they are decoded.

numcodecs' Blosc decoder trusts the compressed size written in a chunk's 16-byte header and reads
that many bytes whatever the buffer holds, so a truncated chunk file (an interrupted copy, a full
disk) is decoded from whatever memory follows it: an error on one run, silently wrong values on
another. (Seen in CI: the statistics sample decoded a half-length chunk that a later read of the
same file failed on.) :func:`install` makes zarr decode Blosc chunks of Zarr v3 arrays and v2
arrays with subclasses that first compare the header with the buffer; a short chunk then fails
every time, and :class:`srdvol.ngff.reads.NamedReads` names it. Encoding is unchanged.
"""

from __future__ import annotations

from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

__all__ = ["CheckedBlosc", "CheckedBloscCodec", "check_blosc_frame", "install"]

_HEADER = 16  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes (little-endian)


def check_blosc_frame(data: Any) -> None:
    """Raise ``ValueError`` when ``data`` is shorter than the Blosc frame its header describes.

    Parameters
    ----------
    data
        The stored bytes of one chunk (any buffer).
    """
    view = memoryview(np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8)))
    if len(view) < _HEADER:
        raise ValueError(
            f"truncated blosc chunk: {len(view)} bytes, shorter than the 16-byte blosc header"
        )
    expected = int.from_bytes(view[12:16], "little")
    if expected > len(view):
        raise ValueError(
            f"truncated blosc chunk: {len(view)} of the {expected} bytes its header gives"
        )


class CheckedBloscCodec(BloscCodec):  # type: ignore[misc]
    """zarr's v3 Blosc codec, decoding only complete frames."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        check_blosc_frame(chunk_bytes.as_numpy_array())
        return super()._decode_sync(chunk_bytes, chunk_spec)


class CheckedBlosc(numcodecs.Blosc):  # type: ignore[misc]
    """numcodecs' Blosc (the compressor of Zarr v2 arrays), decoding only complete frames."""

    codec_id = "blosc"

    def decode(self, buf: Any, out: Any = None) -> Any:
        check_blosc_frame(buf)
        return super().decode(buf, out)


_QUALNAME = f"{CheckedBloscCodec.__module__}.{CheckedBloscCodec.__qualname__}"


def install() -> None:
    """Make zarr use the checked codecs for arrays opened from now on (idempotent).

    Runs when :mod:`srdvol.ngff.reads` is imported, in the client and in every worker process
    that reads through it.
    """
    zarr.registry.register_codec("blosc", CheckedBloscCodec)
    zarr.config.set({"codecs.blosc": _QUALNAME})
    numcodecs.registry.register_codec(CheckedBlosc)
