"""Read OME-Zarr images (NGFF 0.4 and 0.5) and plain Zarr arrays as lazy, labelled arrays.

The input is never written to: every store is opened with ``mode="r"``. The result of
:func:`open_image` is an :class:`xarray.DataArray` whose data is a dask array over the Zarr array
(one dask chunk per storage chunk, or per shard when the array is sharded), with canonical dims
(a subset of ``t c z y x`` in the store's order), physical coordinates and the NGFF scale, units
and translation as attributes.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from srdvol.axes import parse_axes, validate_axes
from srdvol.errors import (
    DataError,
    InputError,
    SrdvolError,
    StoreNotFoundError,
    UnsupportedDtypeError,
)
from srdvol.ngff import blosc

__all__ = ["MIN_FRAMES", "NamedReads", "check_image", "describe_image", "open_image"]

blosc.install()  # a truncated chunk fails every read instead of decoding stray memory

#: The smallest patch_t the network accepts; a shorter movie cannot be denoised.
MIN_FRAMES = 16

_SPACE_NAMES = {"z", "y", "x"}


def open_image(
    path: str | os.PathLike[str],
    *,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
) -> xr.DataArray:
    """Open an OME-Zarr image or a plain Zarr array read-only as a lazy labelled array.

    Parameters
    ----------
    path
        Local path or fsspec URL (``file://``, ``s3://``, ``memory://`` ...) of an OME-Zarr image
        group (NGFF 0.4 on Zarr v2 or 0.5 on Zarr v3) or of a plain Zarr array.
    level
        Multiscale level to read (0 is full resolution).
    axes
        Axis names in storage order, for example ``"tzyx"``. Required for a plain Zarr array;
        for an OME-Zarr image it overrides the names in the metadata.
    channel
        Keep only this channel index (the ``c`` axis stays, with length 1, so the output keeps
        the input's axes).

    Returns
    -------
    xarray.DataArray
        Lazy dask-backed array; dims are canonical axis names; coords are physical positions
        (``scale * index + translation``) on every axis but ``c``; attrs hold ``axes_units``,
        ``scale``, ``translation``, ``source``, ``level``, ``levels``, ``ngff_version``,
        ``store_chunks`` and ``channel``.

    Raises
    ------
    StoreNotFoundError
        The path does not exist or is not a Zarr store.
    InputError
        Missing axes (no OME metadata and no ``axes``), no time axis, a level or channel out of
        range.
    DataError
        Fewer than :data:`MIN_FRAMES` frames.
    UnsupportedDtypeError
        Complex, bool or non-numeric dtype.
    """
    image = _open_unchecked(path, level=level, axes=axes, channel=channel)
    check_image(image)
    return image


def check_image(image: xr.DataArray) -> None:
    """Check that an opened image can be denoised (numeric dtype, at least 16 frames).

    Parameters
    ----------
    image
        An array returned by :func:`open_image` (or any DataArray with a ``t`` dim).

    Raises
    ------
    UnsupportedDtypeError
        If the dtype is complex, bool or not numeric.
    DataError
        If the time axis is shorter than :data:`MIN_FRAMES`.
    """
    subject = image.attrs.get("source")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "iuf":
        kind = {"c": "complex", "b": "bool"}.get(dtype.kind, "non-numeric")
        raise UnsupportedDtypeError(
            subject,
            f"the image has {kind} dtype {dtype}, which srdvol cannot denoise",
            "convert it to an integer or real floating-point dtype (for example uint16 or "
            "float32) first",
        )
    frames = image.sizes["t"]
    if frames < MIN_FRAMES:
        raise DataError(
            subject,
            f"the time axis has {frames} frames, fewer than the {MIN_FRAMES} the smallest patch "
            "needs",
            f"denoise a recording with at least {MIN_FRAMES} frames (check --axes if t is not "
            "the time axis)",
        )


def describe_image(
    path: str | os.PathLike[str],
    *,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
) -> dict[str, Any]:
    """Summarise an image for ``srdvol info``, without reading any pixel data.

    Structural problems (not a store, no axes, no time axis) raise as in :func:`open_image`;
    content problems that would stop ``denoise`` (dtype, too few frames) are listed under
    ``"problems"`` instead so that the summary can still be shown.

    Returns
    -------
    dict
        ``source``, ``ngff_version``, ``level``, ``levels``, ``axes`` (str), ``shape``
        ({axis: int}), ``dtype`` (str), ``chunks`` ({axis: int}, storage chunks),
        ``scale``, ``translation``, ``axes_units``, ``movies`` (number of (c, z) planes, each one
        (t, y, x) movie), ``nbytes`` (uncompressed), ``bytes_on_disk`` (stored size of the
        level's array; ``None`` if the filesystem cannot tell), ``missing_chunks`` (a
        :class:`srdvol.ngff.storecheck.MissingChunks` from one listing of the store; ``None`` if it
        cannot be listed) and ``problems`` (list of str).
    """
    from srdvol.ngff.storecheck import find_missing_chunks

    image = _open_unchecked(path, level=level, axes=axes, channel=channel)
    problems: list[str] = []
    try:
        check_image(image)
    except InputError as err:
        problems.append(str(err))
    movies = 1
    for name in ("c", "z"):
        movies *= image.sizes.get(name, 1)
    return {
        "source": image.attrs["source"],
        "ngff_version": image.attrs["ngff_version"],
        "level": image.attrs["level"],
        "levels": image.attrs["levels"],
        "axes": "".join(map(str, image.dims)),
        "shape": {str(d): int(n) for d, n in image.sizes.items()},
        "dtype": str(image.dtype),
        "chunks": dict(image.attrs["store_chunks"]),
        "scale": dict(image.attrs["scale"]),
        "translation": dict(image.attrs["translation"]),
        "axes_units": dict(image.attrs["axes_units"]),
        "movies": movies,
        "nbytes": int(image.nbytes),
        "bytes_on_disk": _bytes_on_disk(image.attrs["source"], image.attrs["array_path"]),
        "missing_chunks": find_missing_chunks(
            image.attrs["source"],
            array_path=image.attrs["array_path"],
            dims=[str(d) for d in image.dims],
            channel=channel,
        ),
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------
# opening


def _open_unchecked(
    path: str | os.PathLike[str], *, level: int, axes: str | None, channel: int | None
) -> xr.DataArray:
    """Open and label the array; check structure (axes, level, channel) but not content."""
    source = os.fspath(path)
    node = _open_node(source)
    if isinstance(node, zarr.Array):
        if axes is None:
            raise InputError(
                source,
                "this is a plain Zarr array without OME-Zarr axis metadata",
                "pass the axis order with --axes (for example --axes tzyx)",
            )
        if level != 0:
            raise InputError(
                source,
                f"level {level} was requested but a plain Zarr array has only level 0",
                "drop --level or point at an OME-Zarr image with a pyramid",
            )
        names = _axes_for(axes, node.ndim, source)
        meta = _Meta(names, {}, {n: 1.0 for n in names}, {n: 0.0 for n in names}, None, 1, "")
        array = node
    else:
        meta = _read_multiscales(node, source, level=level, axes=axes)
        array = _level_array(node, meta.array_path, source)
        if array.ndim != len(meta.axes):
            raise InputError(
                source,
                f"level {level} has {array.ndim} dimensions but the metadata names "
                f"{len(meta.axes)} axes",
                "repair the multiscales metadata or pass matching --axes",
            )
    return _to_dataarray(array, meta, source=source, level=level, channel=channel)


def _open_node(source: str) -> zarr.Array | zarr.Group:
    """Open a Zarr group or array read-only, turning every kind of failure into one error."""
    from srdvol.ngff.remote import check_readable

    if "://" not in source and not os.path.exists(source):
        raise StoreNotFoundError(
            source, "no such file or directory", "check the path of the input image"
        )
    check_readable(source)  # a remote store: endpoint, bucket and credentials, in one sentence
    try:
        return zarr.open(source, mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        metadata = _metadata_file(source, "")
        if metadata is not None and isinstance(err, ValueError | KeyError):
            raise InputError(
                metadata,
                f"the Zarr metadata cannot be read ({type(err).__name__}: {err})",
                "repair this file (compare it with a good copy of the image)",
            ) from err
        # zarr raises GroupNotFoundError (a ValueError and FileNotFoundError) when the path
        # holds no zarr.json/.zgroup/.zarray; a broken metadata document raises ValueError.
        raise StoreNotFoundError(
            source,
            f"this is not a Zarr store (no Zarr group or array metadata found: {err})",
            "point srdvol at an OME-Zarr image (the folder holding zarr.json or .zattrs) or a "
            "Zarr array",
        ) from err


class _Meta:
    """What the multiscales metadata says about one level."""

    def __init__(
        self,
        axes: tuple[str, ...],
        units: dict[str, str | None],
        scale: dict[str, float],
        translation: dict[str, float],
        version: str | None,
        levels: int,
        array_path: str,
    ) -> None:
        self.axes = axes
        self.units = {n: units.get(n) for n in axes}
        self.scale = scale
        self.translation = translation
        self.version = version
        self.levels = levels
        self.array_path = array_path


def _read_multiscales(group: zarr.Group, source: str, *, level: int, axes: str | None) -> _Meta:
    """Parse NGFF 0.4 (``multiscales`` at the top) or 0.5 (under ``ome``) image metadata."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else None
    container = ome if ome is not None else attrs
    multiscales = container.get("multiscales")
    if not multiscales:
        arrays = sorted(group.array_keys())
        hint = f" (it holds the arrays {', '.join(arrays)})" if arrays else ""
        raise InputError(
            source,
            f"this Zarr group has no OME-Zarr multiscales metadata{hint}",
            "point at the array inside it and pass the axis order, for example "
            f"{source.rstrip('/')}/{arrays[0] if arrays else '0'} --axes tzyx",
        )
    ms = multiscales[0]
    if ome is not None:
        version = str(ome.get("version", ms.get("version", "0.5")))
    else:
        version = str(ms.get("version", "0.4"))
    datasets = ms.get("datasets") or []
    if not datasets:
        raise InputError(
            source,
            "the multiscales metadata lists no datasets, so the image has no array to read",
            "repair the image's metadata (each level needs a datasets entry with its path), or "
            "point at the array itself and pass --axes",
        )
    if not 0 <= level < len(datasets):
        raise InputError(
            source,
            f"level {level} does not exist (the image has levels 0 to {len(datasets) - 1})",
            f"pass --level between 0 and {len(datasets) - 1}",
        )
    raw_axes = ms.get("axes")
    if axes is not None:
        names = _axes_for(axes, len(raw_axes) if raw_axes else None, source)
    elif raw_axes:
        names = _names_from_metadata(raw_axes, source)
    else:
        raise InputError(
            source,
            "the multiscales metadata names no axes (NGFF before 0.3)",
            "pass the axis order with --axes (for example --axes tzyx)",
        )
    units = {}
    for name, entry in zip(names, raw_axes or [], strict=False):
        unit = entry.get("unit") if isinstance(entry, dict) else None
        units[name] = str(unit) if unit else None
    ndim = len(names)
    scale, translation = _transforms(datasets[level].get("coordinateTransformations"), ndim, source)
    top_scale, top_shift = _transforms(ms.get("coordinateTransformations"), ndim, source)
    # The multiscale-wide transform applies after the level's: x -> top(level(x)).
    scale = [s * ts for s, ts in zip(scale, top_scale, strict=True)]
    translation = [t * ts + tt for t, ts, tt in zip(translation, top_scale, top_shift, strict=True)]
    return _Meta(
        names,
        units,
        dict(zip(names, scale, strict=True)),
        dict(zip(names, translation, strict=True)),
        version,
        len(datasets),
        str(datasets[level]["path"]),
    )


def _names_from_metadata(raw_axes: list[Any], source: str) -> tuple[str, ...]:
    """Map NGFF axes (name + type) to canonical names: type time -> t, channel -> c."""
    names: list[str] = []
    for entry in raw_axes:
        name = str(entry["name"] if isinstance(entry, dict) else entry).lower()
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind == "time" or name in {"t", "time"}:
            names.append("t")
        elif kind == "channel" or name in {"c", "ch", "channel"}:
            names.append("c")
        elif name in _SPACE_NAMES:
            names.append(name)
        else:
            names.append(name)  # validate_axes names it in the error
    try:
        return validate_axes(names, subject=source)
    except InputError as err:
        raise InputError(
            source, err.problem, f"{err.fix}; --axes also overrides the metadata's axis names"
        ) from err


def _axes_for(spec: str, ndim: int | None, source: str) -> tuple[str, ...]:
    names = parse_axes(spec, subject=source)
    if ndim is not None and len(names) != ndim:
        raise InputError(
            source,
            f"--axes {''.join(names)} names {len(names)} axes but the array has {ndim}",
            f"give exactly {ndim} axis letters",
        )
    return names


def _transforms(
    items: list[dict[str, Any]] | None, ndim: int, source: str
) -> tuple[list[float], list[float]]:
    """Compose NGFF scale/translation transforms into one per-axis scale and translation."""
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    for item in items or []:
        kind = item.get("type")
        if kind == "identity":
            continue
        if "path" in item:
            raise InputError(
                source,
                f"a {kind} transform stored in a separate file ({item['path']}) is not supported",
                "write the transform inline in the multiscales metadata",
            )
        values = [float(v) for v in item.get(kind, [])]
        if len(values) != ndim:
            continue  # malformed transform: keep pixel units rather than fail on metadata
        if kind == "scale":
            scale = [s * v for s, v in zip(scale, values, strict=True)]
            translation = [t * v for t, v in zip(translation, values, strict=True)]
        elif kind == "translation":
            translation = [t + v for t, v in zip(translation, values, strict=True)]
    return scale, translation


def _metadata_file(source: str, node_path: str) -> str | None:
    """The Zarr metadata file of a node (``zarr.json`` or ``.zarray``/``.zgroup``), if any."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    folder = f"{root.rstrip('/')}/{node_path}" if node_path else root
    for name in ("zarr.json", ".zarray", ".zgroup"):
        try:
            if fs.exists(f"{folder}/{name}"):
                shown = f"{source.rstrip('/')}/{node_path}" if node_path else source
                return f"{shown.rstrip('/')}/{name}"
        except OSError:
            return None
    return None


def _level_array(group: zarr.Group, array_path: str, source: str) -> zarr.Array:
    try:
        node = group[array_path]
    except (KeyError, ValueError, TypeError) as err:
        metadata = _metadata_file(source, array_path)
        if metadata is None:
            raise InputError(
                source,
                f"the multiscales metadata lists the dataset {array_path!r} but the store has "
                "no such array",
                "repair the image or pick another --level",
            ) from err
        raise InputError(
            metadata,
            f"the array metadata cannot be read ({type(err).__name__}: {err})",
            "repair this file (compare it with the zarr.json of another level or a good copy)",
        ) from err
    if not isinstance(node, zarr.Array):
        raise InputError(source, f"{array_path!r} is a group, not an array", "repair the image")
    return node


def _to_dataarray(
    array: zarr.Array, meta: _Meta, *, source: str, level: int, channel: int | None
) -> xr.DataArray:
    names = meta.axes
    storage = array.shards if getattr(array, "shards", None) else array.chunks
    location = f"{source.rstrip('/')}/{meta.array_path}" if meta.array_path else source
    reads = NamedReads(array, location=location, dims=names)
    data = da.from_array(
        reads,
        chunks=storage,
        meta=np.empty((0,) * array.ndim, dtype=array.dtype),
        name=f"srdvol-read-{tokenize(reads)}",
    )
    sizes = dict(zip(names, array.shape, strict=True))
    if channel is not None:
        if "c" not in names:
            raise InputError(
                source,
                f"--channel {channel} was given but the image has no channel axis",
                "drop --channel",
            )
        if not 0 <= channel < sizes["c"]:
            raise InputError(
                source,
                f"channel {channel} does not exist (the image has channels 0 to {sizes['c'] - 1})",
                f"pass --channel between 0 and {sizes['c'] - 1}",
            )
        index = names.index("c")
        cut = [slice(None)] * len(names)
        cut[index] = slice(channel, channel + 1)
        data = data[tuple(cut)]
    coords: dict[str, Any] = {}
    for axis, n in zip(names, data.shape, strict=True):
        if axis == "c":
            start = channel or 0
            coords["c"] = np.arange(start, start + n)
        else:
            coords[axis] = (
                meta.scale[axis] * np.arange(n, dtype=np.float64) + meta.translation[axis]
            )
    attrs = {
        "axes_units": dict(meta.units) if meta.units else {n: None for n in names},
        "scale": dict(meta.scale),
        "translation": dict(meta.translation),
        "source": source,
        "level": level,
        "levels": meta.levels,
        "ngff_version": meta.version,
        "store_chunks": dict(zip(names, (int(c) for c in storage), strict=True)),
        "channel": channel,
        "array_path": meta.array_path,
    }
    return xr.DataArray(data, dims=names, coords=coords, attrs=attrs, name="image")


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


def _bytes_on_disk(source: str, array_path: str) -> int | None:
    """Stored (compressed) size of one array, or ``None`` when the filesystem cannot tell."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source)
        target = f"{root.rstrip('/')}/{array_path}" if array_path else root
        return int(fs.du(target, total=True))
    except (OSError, ValueError, NotImplementedError):
        return None
