"""Checks of storage locations made before any work: input chunks present, output writable.

- :func:`find_missing_chunks` lists the chunk keys of the input's level array *once* (one
  recursive listing through fsspec, which pages through object stores such as S3 1,000 keys per
  request, never one request per chunk) and compares them with the chunk grid. Zarr reads an
  absent chunk as the fill value without a word, so an incomplete copy or a ``shape`` enlarged
  in ``zarr.json`` would otherwise be denoised as frames of zeros. :func:`check_chunks` turns
  missing chunks into an error unless the caller allows them (zarr writers legitimately omit
  chunks that equal the fill value: ``write_empty_chunks=False`` is zarr 3's default).
- :func:`probe_writable` writes and removes one empty file where the output (or model) will go,
  so a read-only or permission-denied location is reported before hours of work, and
  :func:`check_free_space` compares the free space with the output's size.
- :func:`storage_errors` turns a full disk or a read-only file system met *during* a run into
  one sentence that says how to resume.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from srdvol.errors import DataError, OutputPathError, SrdvolError, flag

__all__ = [
    "MissingChunks",
    "check_chunks",
    "check_free_space",
    "find_missing_chunks",
    "probe_writable",
    "storage_errors",
]

#: How many missing chunk positions a message lists.
SHOWN_POSITIONS = 3
#: Refuse an output location with less free space than this fraction of the output's
#: uncompressed size: it could only fit with better than 2x compression, and denoised float32
#: data compresses about 1.4-1.5x with srdvol's blosc-zstd codec (measured on simulated ground
#: truth). Between this and the full size the run goes ahead with a warning.
MIN_FREE_FRACTION = 0.5
#: Errors of the output location (rather than of srdvol or the data).
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


# --------------------------------------------------------------------------------------------
# missing input chunks


@dataclass(frozen=True)
class MissingChunks:
    """Chunks (or shards) of an input array that the store does not hold.

    Attributes
    ----------
    array
        Path or URL of the level array (store path plus the array's path inside it).
    count, total
        Missing chunks, and chunks in the part of the grid that is read.
    positions
        The first few missing chunks as array regions, ``{axis: (start, stop)}``.
    fill_value
        What zarr returns for a missing chunk.
    stored
        The region of one chunk that is there (``None`` if none is).
    """

    array: str
    count: int
    total: int
    positions: tuple[dict[str, tuple[int, int]], ...]
    fill_value: Any
    stored: dict[str, tuple[int, int]] | None = None

    def where(self) -> str:
        """The listed positions as text, ``t=16:32, y=0:64, x=0:64; ...``."""
        parts = [
            ", ".join(f"{axis}={start}:{stop}" for axis, (start, stop) in region.items())
            for region in self.positions
        ]
        more = "; ..." if self.count > len(self.positions) else ""
        return "; ".join(parts) + more

    def describe(self) -> str:
        """``"1 of the 2 chunks is missing (at t=16:32, ...)"`` for messages."""
        verb = "is" if self.count == 1 else "are"
        return f"{self.count} of the {self.total} chunks {verb} missing (at {self.where()})"


def _join(root: str, path: str) -> str:
    return f"{root.rstrip('/')}/{path}" if path else root


def _key_format(array: Any) -> tuple[str | None, str]:
    """(prefix, separator) of the array's chunk keys: ``("c", "/")`` for zarr 3's default."""
    meta = array.metadata
    if meta.zarr_format == 3:
        encoding = meta.chunk_key_encoding
        prefix = "c" if encoding.name == "default" else None
        return prefix, str(encoding.separator)
    return None, str(getattr(meta, "dimension_separator", None) or ".")


def _parse_key(key: str, prefix: str | None, separator: str, ndim: int) -> tuple[int, ...] | None:
    parts = key.split(separator)
    if prefix is not None:
        if not parts or parts[0] != prefix:
            return None
        parts = parts[1:]
    if len(parts) != ndim or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _stored_keys(location: str) -> list[str] | None:
    """Every file under the array's folder, relative to it (``None``: the store cannot list)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(location)
        found = fs.find(root, withdirs=False)
    except (OSError, NotImplementedError, ValueError):
        return None
    base = root.rstrip("/") + "/"
    keys = [str(p)[len(base) :] if str(p).startswith(base) else str(p) for p in found]
    # A listing that misses the array's own metadata file is not a listing we can trust (an
    # HTTP store without directory listings answers with nothing).
    if not {"zarr.json", ".zarray"} & set(keys):
        return None
    return keys


def find_missing_chunks(
    source: str | os.PathLike[str],
    *,
    array_path: str = "",
    dims: Sequence[str] | None = None,
    region: Mapping[str, Sequence[int]] | None = None,
) -> MissingChunks | None:
    """List the chunks a Zarr array's store holds and report those it lacks.

    Parameters
    ----------
    source
        Path or URL of the image (or of a plain array).
    array_path
        The level array inside it (``"s0"``; ``""`` for a plain array).
    dims
        Axis names, for the positions (default ``dim_0, dim_1, ...``).
    region
        Only the chunks overlapping this part count: ``{axis: (start, stop)}`` in the array's
        indices (a selection read with ``srdvol.ngff.read.open_image(..., select=)``).

    Returns
    -------
    MissingChunks or None
        ``count == 0`` when every chunk is there; ``None`` when the store cannot list its keys
        (then nothing is known).
    """
    import zarr

    location = _join(os.fspath(source), array_path)
    array = zarr.open_array(location, mode="r")
    keys = _stored_keys(location)
    if keys is None:
        return None
    chunk = tuple(int(c) for c in (getattr(array, "shards", None) or array.chunks))
    shape = tuple(int(n) for n in array.shape)
    grid = tuple(math.ceil(n / c) if n else 0 for n, c in zip(shape, chunk, strict=True))
    present = np.zeros(grid, dtype=bool)
    prefix, separator = _key_format(array)
    for key in keys:
        coords = _parse_key(key, prefix, separator, len(grid))
        if coords is not None and all(i < n for i, n in zip(coords, grid, strict=True)):
            present[coords] = True
    names = list(dims) if dims is not None else [f"dim_{i}" for i in range(len(grid))]
    offset = [0] * len(grid)
    for axis_name, (start, stop) in (region or {}).items():
        if axis_name not in names:
            continue
        axis = names.index(axis_name)
        first, last = int(start) // chunk[axis], -(-int(stop) // chunk[axis])
        present = np.take(present, range(first, last), axis=axis)
        offset[axis] = first

    def region(index: Sequence[int]) -> dict[str, tuple[int, int]]:
        return {
            name: ((int(i) + o) * c, min((int(i) + o + 1) * c, n))
            for name, i, o, c, n in zip(names, index, offset, chunk, shape, strict=True)
        }

    missing = np.argwhere(~present)
    stored = np.argwhere(present)[:1] if len(missing) else []
    return MissingChunks(
        array=location,
        count=len(missing),
        total=int(present.size),
        positions=tuple(region(where) for where in missing[:SHOWN_POSITIONS]),
        fill_value=array.fill_value,
        stored=region(stored[0]) if len(stored) else None,
    )


def check_chunks(image: Any, *, allow_missing: bool = False) -> MissingChunks | None:
    """Refuse an input whose level array lacks chunks, unless ``allow_missing``.

    Before blaming missing chunks, one stored chunk is read: when the chunk shape in the
    metadata disagrees with the data, that read names the real problem.

    Parameters
    ----------
    image
        An image from :func:`srdvol.ngff.read.open_image` (``attrs`` ``source``, ``array_path``,
        ``channel``).
    allow_missing
        Return the finding instead of raising (the caller warns).

    Returns
    -------
    MissingChunks or None
        What was found (``count`` may be 0), or ``None`` if the store cannot be listed.

    Raises
    ------
    DataError
        If chunks are missing and ``allow_missing`` is false, or a stored chunk is unreadable.
    """
    found = find_missing_chunks(
        image.attrs["source"],
        array_path=image.attrs.get("array_path", ""),
        dims=[str(d) for d in image.dims],
        region=image.attrs.get("selection"),
    )
    if found is None or found.count == 0:
        return found
    if found.stored is not None:
        _read_region(image, found.stored)
    if not allow_missing:
        raise DataError(
            found.array,
            f"{found.describe()}, and zarr would read {'it' if found.count == 1 else 'them'} "
            f"as the fill value {found.fill_value} (an incomplete copy, or a shape in the "
            "metadata larger than the data written)",
            f"copy the image again from its source, or pass {flag('allow_missing_chunks')} if the "
            "writer left out chunks equal to the fill value on purpose",
        )
    return found


def _read_region(image: Any, region: dict[str, tuple[int, int]]) -> None:
    """Read one chunk's region (array coordinates) through the image, so that a chunk that
    cannot be decoded is named before missing chunks are blamed; the image may be a part of
    the array (its ``selection``), so the region is cut to that part first."""
    selection = image.attrs.get("selection") or {}
    index = []
    for dim, (start, stop) in region.items():
        first, last = selection.get(dim, (0, stop))
        index.append(slice(max(start, first) - first, min(stop, last) - first))
    image.data[tuple(index)].compute(scheduler="sync")


# --------------------------------------------------------------------------------------------
# output locations


def _is_url(path: str) -> bool:
    return "://" in path


def _existing_folder(path: str) -> str:
    """The folder a local path will be written in: itself if a folder, else the nearest
    existing ancestor."""
    current = os.path.abspath(path)
    if os.path.isdir(current):
        return current
    current = os.path.dirname(current)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in _FULL:
        return "the disk is full"
    return exc.strerror or type(exc).__name__


def probe_writable(
    path: str | os.PathLike[str], *, subject: str | os.PathLike[str] | None = None
) -> None:
    """Write and remove one empty file where ``path`` will be written; nothing is left behind.

    A local path is probed in itself when it is an existing folder, else in its nearest
    existing ancestor (srdvol creates the missing folders). A URL is probed with one small
    object next to it, deleted at once.

    Parameters
    ----------
    path
        Output image, model file, or folder about to be written.
    subject
        What the message names (default ``path``).

    Raises
    ------
    OutputPathError
        If the location cannot be written (read-only file system, permission denied, a file
        where a folder is needed).
    """
    target = os.fspath(path)
    named = os.fspath(subject) if subject is not None else target
    if _is_url(target):
        _probe_url(target, named)
        return
    folder = _existing_folder(target)
    if not os.path.isdir(folder):
        raise OutputPathError(
            named,
            f"{folder} is a file, so no folder can be created there",
            "choose an output path whose parent is a folder",
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".srdvol-probe-", dir=folder)
    except OSError as exc:
        raise OutputPathError(
            named,
            f"{folder} cannot be written ({_reason(exc)})",
            "choose a writable location (check the mount and its permissions)",
        ) from None
    os.close(handle)
    os.remove(probe)


def _probe_url(target: str, named: str) -> None:
    from srdvol.ngff.remote import filesystem, translated

    fs, root = filesystem(target)
    suffix = f".srdvol-probe-{uuid.uuid4().hex[:8]}"
    probe = root.rstrip("/") + suffix
    try:
        # an unreachable endpoint, absent or refused credentials, a missing bucket: one sentence
        with translated(named, writing=True, fs=fs):
            fs.pipe_file(probe, b"")
            try:
                fs.rm_file(probe)
            except PermissionError:
                # may write but not delete: srdvol removes its lock file (and this probe)
                raise OutputPathError(
                    named,
                    "the credentials may write objects there but not delete them, and srdvol "
                    f"deletes its lock file when it ends (the probe {target.rstrip('/')}{suffix} "
                    "it wrote is left behind)",
                    "use credentials that may also delete there (s3:DeleteObject), and delete "
                    "the probe object",
                ) from None
    except OSError as exc:
        if isinstance(exc, SrdvolError):
            raise
        raise OutputPathError(
            named,
            f"the location cannot be written ({_reason(exc)})",
            "choose a writable location or check the credentials' write permission",
        ) from None


def check_free_space(
    path: str | os.PathLike[str],
    *,
    needed: int,
    subject: str | os.PathLike[str] | None = None,
) -> str | None:
    """Compare the free space where ``path`` will be written with what it needs.

    Parameters
    ----------
    path
        The output image (local; URLs report no free space and are not checked, and neither is
        an output that exists already: a resumed run has written part of it, and measuring how
        much would mean a stat of every chunk file).
    needed
        Uncompressed bytes the finished output holds.
    subject
        What the message names (default ``path``).

    Returns
    -------
    str or None
        A warning when the space fits only if the data compresses (``None`` when it fits).

    Raises
    ------
    OutputPathError
        If the free space is less than :data:`MIN_FREE_FRACTION` of what is needed.
    """
    target = os.fspath(path)
    if _is_url(target) or os.path.exists(target):
        return None
    named = os.fspath(subject) if subject is not None else target
    try:
        free = shutil.disk_usage(_existing_folder(target)).free
    except OSError:
        return None
    if free >= needed:
        return None
    have, want = _size(free), _size(needed)
    if free < MIN_FREE_FRACTION * needed:
        raise OutputPathError(
            named,
            f"the disk has {have} free and the output needs up to {want} (uncompressed)",
            "free some space or choose an output location on a larger disk",
        )
    return (
        f"{named}: the disk has {have} free and the output needs up to {want} uncompressed; "
        "it fits only if the data compresses well (free some space if the run stops)"
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def storage_errors(subject: str | os.PathLike[str], *, resume: str) -> Iterator[None]:
    """Turn a full disk or an unwritable file met while writing into one sentence.

    Errors raised in Dask tasks arrive here with their errno (``OSError`` pickles it).

    Parameters
    ----------
    subject
        The output (or model) being written.
    resume
        What to do afterwards, e.g. ``"run the same command again to resume"``.

    Raises
    ------
    OutputPathError
        For ENOSPC/EDQUOT (full disk or quota) and EROFS/EACCES/EPERM; other errors pass.
    """
    from srdvol.ngff.remote import translated

    try:
        # a remote output whose endpoint went away, or whose credentials expired, mid-run
        with translated(subject, writing=True, then=resume):
            yield
    except OSError as exc:
        if isinstance(exc, SrdvolError) or exc.errno not in _FULL | _DENIED:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        if exc.errno in _FULL:
            problem = f"the disk filled up{where} ({exc.strerror})"
            fix = f"free some space or move the output to a larger disk, then {resume}"
        else:
            problem = f"the location became unwritable{where} ({exc.strerror})"
            fix = f"make it writable again, then {resume}"
        raise OutputPathError(subject, problem, fix) from None
