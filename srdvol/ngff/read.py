"""Read OME-Zarr images (NGFF 0.4 and 0.5) and plain Zarr arrays as lazy, labelled arrays.

The input is never written to: every store is opened with ``mode="r"``. The result of
:func:`open_image` is an :class:`xarray.DataArray` whose data is a dask array over the Zarr array
(one dask chunk per storage chunk, or per shard when the array is sharded), with canonical dims
(a subset of ``t c z y x`` in the store's order), physical coordinates and the NGFF scale, units
and translation as attributes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from srdvol.errors import (
    ConfigError,
    DataError,
    InputError,
    StoreNotFoundError,
    UnsupportedDtypeError,
    flag,
)
from srdvol.ngff.metadata import LevelMetadata, axes_for, read_image_metadata
from srdvol.ngff.reads import NamedReads
from srdvol.values import Span

__all__ = ["MIN_FRAMES", "NamedReads", "check_image", "describe_image", "open_image"]

#: The smallest patch_t the network accepts; a shorter movie cannot be denoised.
MIN_FRAMES = 16


def open_image(
    path: str | os.PathLike[str],
    *,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
    select: Mapping[str, Any] | None = None,
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
        the input's axes); the same as ``select={"c": channel}``.
    select
        Read only a part: ``{axis: span}`` with spans ``"START:STOP"``, ``(start, stop)`` or
        one index (:class:`srdvol.values.Span`). Every axis stays; the translation moves to the
        part's origin so it lines up with the whole image in a viewer, and
        ``attrs["selection"]`` records ``{axis: [start, stop]}`` in the level's indices.

    Returns
    -------
    xarray.DataArray
        Lazy dask-backed array; dims are canonical axis names; coords are physical positions
        (``scale * index + translation``) on every axis but ``c``; attrs hold ``axes_units``,
        ``scale``, ``translation``, ``source``, ``level``, ``levels``, ``ngff_version``,
        ``store_chunks``, ``channel`` (the first channel read, or None) and ``selection``.

    Raises
    ------
    StoreNotFoundError
        The path does not exist or is not a Zarr store.
    InputError
        Missing axes (no OME metadata and no ``axes``), no time axis, a level, channel or
        selection out of range.
    DataError
        Fewer than :data:`MIN_FRAMES` frames.
    UnsupportedDtypeError
        Complex, bool or non-numeric dtype.
    """
    image = _open_unchecked(path, level=level, axes=axes, select=_selection(channel, select))
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
            f"denoise a recording with at least {MIN_FRAMES} frames (check {flag('axes')} if "
            "t is not the time axis)",
        )


def describe_image(
    path: str | os.PathLike[str],
    *,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
    select: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarise an image (or the part ``select`` names, as for :func:`open_image`) for
    ``srdvol info``, without reading any pixel data.

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

    image = _open_unchecked(path, level=level, axes=axes, select=_selection(channel, select))
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
            region=image.attrs["selection"],
        ),
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------
# opening


def _selection(channel: int | None, select: Mapping[str, Any] | None) -> dict[str, Span]:
    spans = {str(a): Span.parse(v, name=str(a)) for a, v in (select or {}).items()}
    if channel is not None:
        if "c" in spans:
            raise ConfigError(
                flag("c"), f"given together with {flag('channel')}", "give only one of them"
            )
        spans["c"] = Span(int(channel), int(channel) + 1)
    return spans


def _open_unchecked(
    path: str | os.PathLike[str], *, level: int, axes: str | None, select: dict[str, Span]
) -> xr.DataArray:
    """Open and label the array; check structure (axes, level, selection) but not content."""
    source = os.fspath(path)
    node = _open_node(source)
    if isinstance(node, zarr.Array):
        if axes is None:
            raise InputError(
                source,
                "this is a plain Zarr array without OME-Zarr axis metadata",
                f"pass the axis order, for example {flag('axes')}=tzyx",
            )
        if level != 0:
            raise InputError(
                source,
                f"level {level} was requested but a plain Zarr array has only level 0",
                f"drop {flag('level')} or point at an OME-Zarr image with a pyramid",
            )
        meta = LevelMetadata.plain(axes_for(axes, node.ndim, source))
        array = node
    else:
        meta = read_image_metadata(node, source, level=level, axes=axes)
        array = _level_array(node, meta.array_path, source)
        if array.ndim != len(meta.axes):
            raise InputError(
                source,
                f"level {level} has {array.ndim} dimensions but the metadata names "
                f"{len(meta.axes)} axes",
                f"repair the multiscales metadata or pass matching {flag('axes')}",
            )
    return _to_dataarray(array, meta, source=source, level=level, select=select)


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
                f"repair the image or pick another {flag('level')}",
            ) from err
        raise InputError(
            metadata,
            f"the array metadata cannot be read ({type(err).__name__}: {err})",
            "repair this file (compare it with the zarr.json of another level or a good copy)",
        ) from err
    if not isinstance(node, zarr.Array):
        raise InputError(source, f"{array_path!r} is a group, not an array", "repair the image")
    return node


def _bounds(
    select: dict[str, Span], names: tuple[str, ...], shape: tuple[int, ...], source: str
) -> dict[str, tuple[int, int]]:
    """Each selected axis's ``(start, stop)`` in the level's indices, checked against it."""
    sizes = dict(zip(names, shape, strict=True))
    bounds = {}
    for axis, span in select.items():
        option = "channel" if axis == "c" else axis
        if axis not in sizes:
            raise InputError(
                source,
                f"{flag(option)} {span.text()} was given but the image has no {axis} axis "
                f"(axes {''.join(names)})",
                f"drop {flag(option)}",
            )
        try:
            bounds[axis] = span.bounds(sizes[axis])
        except ValueError as exc:
            last = sizes[axis] - 1
            fix = f"give a range inside 0:{sizes[axis]}"
            problem = f"{flag(option)} {exc}"
            if span.stop == span.start + 1:  # one index
                fix = f"pass {flag(option)} between 0 and {last}"
                problem = f"{flag(option)} {span.start} does not exist ({axis} indices 0 to {last})"
            raise InputError(source, problem, fix) from None
    return bounds


def _to_dataarray(
    array: zarr.Array, meta: LevelMetadata, *, source: str, level: int, select: dict[str, Span]
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
    bounds = _bounds(select, names, tuple(array.shape), source)
    if bounds:  # slicing the lazy array: only the chunks of the part are ever read
        data = data[tuple(slice(*bounds.get(a, (None, None))) for a in names)]
    starts = {a: bounds.get(a, (0, 0))[0] for a in names}
    # The part's origin in physical units (the channel axis keeps its own: a channel index is
    # not a position).
    translation = {
        a: meta.translation[a] + (0 if a == "c" else starts[a] * meta.scale[a])
        for a in names
        if a in meta.translation
    }
    coords: dict[str, Any] = {}
    for axis, n in zip(names, data.shape, strict=True):
        if axis == "c":
            coords["c"] = np.arange(starts["c"], starts["c"] + n)
        else:
            coords[axis] = meta.scale[axis] * np.arange(n, dtype=np.float64) + translation[axis]
    attrs = {
        "axes_units": dict(meta.units),
        "scale": dict(meta.scale),
        "translation": translation,
        "source": source,
        "level": level,
        "levels": meta.levels,
        "ngff_version": meta.version,
        "store_chunks": dict(zip(names, (int(c) for c in storage), strict=True)),
        "channel": bounds["c"][0] if "c" in bounds else None,
        "selection": {a: list(b) for a, b in bounds.items()},
        "array_path": meta.array_path,
    }
    return xr.DataArray(data, dims=names, coords=coords, attrs=attrs, name="image")


def _bytes_on_disk(source: str, array_path: str) -> int | None:
    """Stored (compressed) size of one array, or ``None`` when the filesystem cannot tell."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source)
        target = f"{root.rstrip('/')}/{array_path}" if array_path else root
        return int(fs.du(target, total=True))
    except (OSError, ValueError, NotImplementedError):
        return None
