"""Create the output OME-Zarr image, or reopen it to resume, or refuse it.

The client creates everything that is metadata (group, level-0 array ``s0``, NGFF multiscales,
omero rendering hints, srdvol provenance) *once*, before any worker runs; workers only write
whole chunks of ``s0`` (see :func:`open_output_array`). :func:`srdvol.ngff.pyramid.write_pyramid`
then adds the viewing pyramid. The NGFF version's differences (Zarr format, codec, where the
metadata lives) come from its format object (:mod:`srdvol.ngff.formats`); the metadata is built
and validated with ome-zarr-models.

Defaults (documented here because users see them in their files):

- chunks: 1 along ``c`` and ``z``; up to 512 along ``y`` and ``x`` (a 512x512 frame is one
  chunk, what a viewer loads per tile); along ``t`` the largest power of two up to 16 that keeps
  a chunk at or below 4 MiB uncompressed (4 frames for 512x512 float32). Small along ``t`` so
  scrolling frames in napari, or reading a few frames for the next analysis, decompresses
  little data.
- compression: blosc-zstd, level 3, bit-shuffle (fast, and float32 noise-reduced data compresses
  well with bit-shuffle).
- rendering hints: see :mod:`srdvol.ngff.omero`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xarray as xr
import zarr

from srdvol.axes import validate_axes
from srdvol.errors import ConfigError, InputError, OutputExistsError, OutputPathError, flag
from srdvol.ngff.formats import FORMATS, NgffFormat, format_for
from srdvol.ngff.metadata import axes_metadata, level_dataset, read_multiscale
from srdvol.ngff.omero import omero_hints
from srdvol.ngff.paths import check_output_path, exists, is_zarr_store, remove
from srdvol.ngff.provenance import (
    PROVENANCE_KEY,
    make_run_id,
    new_record,
    read_provenance,
    record_differences,
)
from srdvol.ngff.pyramid import (
    PYRAMID_MIN_SIZE,
    level_datasets,
    level_path,
    output_nbytes,
    pyramid_shapes,
    write_pyramid,
)
from srdvol.options import OutputDtype, OutputOptions

__all__ = [
    "CHUNK_BYTES",
    "NGFF_VERSIONS",
    "PYRAMID_MIN_SIZE",
    "check_output",
    "check_output_path",
    "create_output",
    "make_run_id",
    "open_output_array",
    "output_chunks",
    "output_dtype",
    "output_nbytes",
    "pyramid_shapes",
    "read_provenance",
    "write_pyramid",
]
# check_output_path, make_run_id, read_provenance, output_nbytes, pyramid_shapes, write_pyramid
# and PYRAMID_MIN_SIZE live in paths, provenance and pyramid; they are named here too because
# the commands import the whole output API from this module.

#: Target uncompressed chunk size used to pick the default chunk length along t.
CHUNK_BYTES = 4 * 2**20
#: NGFF versions srdvol writes: 0.5 on Zarr v3 (default), 0.4 on Zarr v2 for older readers.
NGFF_VERSIONS = tuple(FORMATS)
_PLANE_CHUNK = 512
_MAX_T_CHUNK = 16


def output_chunks(
    shape: Mapping[str, int],
    *,
    dtype: Any = "float32",
    chunks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Chunk shape of the output: the module defaults, overridden per axis by ``chunks``.

    Parameters
    ----------
    shape
        Axis name -> length, in storage order.
    dtype
        Output dtype (sets how many frames fit in :data:`CHUNK_BYTES`).
    chunks
        Axis name -> chunk length for the axes to override.

    Returns
    -------
    dict
        Axis name -> chunk length (never longer than the axis), in the order of ``shape``.

    Raises
    ------
    ConfigError
        If ``chunks`` names an unknown axis or a non-positive length.
    """
    chunks = dict(chunks or {})
    unknown = [a for a in chunks if a not in shape]
    if unknown:
        raise ConfigError(
            flag("chunks"),
            f"names axes {unknown} that the image does not have (it has {''.join(shape)})",
            f"give chunk lengths for the axes {''.join(shape)} only",
        )
    bad = {a: n for a, n in chunks.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise ConfigError(
            flag("chunks"), f"chunk lengths {bad} are not positive", "use lengths >= 1"
        )
    itemsize = np.dtype(dtype).itemsize
    result: dict[str, int] = {}
    for axis in ("c", "z", "y", "x"):
        if axis in shape:
            default = 1 if axis in ("c", "z") else _PLANE_CHUNK
            result[axis] = min(chunks.get(axis, default), shape[axis])
    plane = itemsize * result["y"] * result["x"]
    frames = _MAX_T_CHUNK
    while frames > 1 and frames * plane > CHUNK_BYTES:
        frames //= 2
    result["t"] = min(chunks.get("t", frames), shape["t"])
    return {axis: result[axis] for axis in shape}


def output_dtype(dtype: OutputDtype | str, like: xr.DataArray) -> np.dtype[Any]:
    """The dtype an output option asks for: float32, or the input's (``"input"``).

    Raises
    ------
    ConfigError
        Naming ``dtype``, if the result is not an integer or real float dtype.
    """
    text = str(getattr(dtype, "value", dtype))
    try:
        out = np.dtype(like.dtype if text == OutputDtype.input.value else text)
    except TypeError:
        out = np.dtype("c8")  # refused just below, with the same message
    if out.kind not in "iuf":
        raise ConfigError(
            flag("dtype"),
            f"output dtype {out} is not an integer or real float",
            f"use {flag('dtype')} float32, or {flag('dtype')} input for an integer or real input",
        )
    return out


def create_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    options: OutputOptions | None = None,
    provenance: Mapping[str, Any],
    chunks: Mapping[str, int] | None = None,
    name: str = "denoised",
    keep: Sequence[str | os.PathLike[str]] = (),
) -> zarr.Array:
    """Create (or reopen for resume) the output image and return its writable level-0 array.

    Everything is validated before anything is written: the path against the input, the dtype
    and the chunks, then what already exists at ``path``.

    Parameters
    ----------
    path
        Local path or fsspec URL of the output OME-Zarr image.
    like
        The input image as returned by :func:`srdvol.ngff.read.open_image`: its dims, shape, scale,
        units and translation are copied; ``attrs["source"]`` is the input path.
    options
        Output dtype (``float32``, or ``input``: the dtype of ``like``), NGFF version (``0.5`` on
        Zarr v3, ``0.4`` on Zarr v2) and ``overwrite`` (replace an existing output that belongs
        to another run, or is not a srdvol output). Default: ``OutputOptions()``.
    provenance
        Run parameters to record under the ``srdvol`` attribute. A ``run_id`` is derived from it
        with :func:`make_run_id` unless given; srdvol's version, the input path and the creation
        time are added.
    chunks
        Axis name -> chunk length overrides (see :func:`output_chunks`).
    name
        Image name in the multiscales metadata, also the omero channel label
        (``"<name> channel <i>"``).
    keep
        Files the output may neither be nor hold (the model), see :func:`check_output_path`.

    Returns
    -------
    zarr.Array
        Level ``s0``, opened for writing (new, or the existing one when resuming the same run).

    Raises
    ------
    OutputPathError
        The output is, lies inside, or contains the input; it is or holds a file of ``keep``;
        or it exists and is not a Zarr store (``overwrite`` only ever replaces Zarr stores).
    OutputExistsError
        Something other than this run's output exists at ``path`` and ``overwrite`` is false, or
        this run's output exists with another shape or dtype.
    ConfigError
        An output dtype that is not an integer or real float, bad chunks.
    """
    plan = _plan_output(
        path, like=like, options=options, provenance=provenance, chunks=chunks, keep=keep
    )
    if plan.action == "resume":
        return open_output_array(plan.target)
    if plan.action == "replace":
        remove(plan.target)
    _write_new(plan, like=like, name=name)
    return open_output_array(plan.target)


def check_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    options: OutputOptions | None = None,
    provenance: Mapping[str, Any],
    chunks: Mapping[str, int] | None = None,
    keep: Sequence[str | os.PathLike[str]] = (),
) -> str:
    """Run every check :func:`create_output` runs, and write nothing.

    Callers use it to refuse a bad output before slow work (training, starting a cluster).
    The parameters are those of :func:`create_output`.

    Returns
    -------
    str
        ``"create"`` (nothing there yet), ``"resume"`` (an output of this run exists) or
        ``"replace"`` (another output exists and ``overwrite`` is set).

    Raises
    ------
    OutputPathError, OutputExistsError, ConfigError
        As :func:`create_output` would.
    """
    return _plan_output(
        path, like=like, options=options, provenance=provenance, chunks=chunks, keep=keep
    ).action


@dataclass(frozen=True)
class _OutputPlan:
    """A validated output request: where, what, in which format, and what to do there."""

    target: str
    fmt: NgffFormat
    axes: tuple[str, ...]
    shape: dict[str, int]
    chunks: dict[str, int]
    dtype: np.dtype[Any]
    record: dict[str, Any]
    action: str
    compression: int


def _plan_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    options: OutputOptions | None,
    provenance: Mapping[str, Any],
    chunks: Mapping[str, int] | None,
    keep: Sequence[str | os.PathLike[str]],
) -> _OutputPlan:
    """Validate an output request against the input and what exists; decide what to do."""
    options = options or OutputOptions()
    target = os.fspath(path)
    source = like.attrs.get("source")
    if source:
        check_output_path(target, source, keep=keep)
    fmt = format_for(options.ngff)
    out_dtype = output_dtype(options.dtype, like)
    axes = validate_axes([str(d) for d in like.dims], subject=source or target)
    shape = {a: int(n) for a, n in zip(axes, like.shape, strict=True)}
    wanted = {**(options.chunk_map() or {}), **dict(chunks or {})}
    chunk_map = output_chunks(shape, dtype=out_dtype, chunks=wanted or None)
    record = new_record(provenance, like=like, ngff=fmt.version, dtype=out_dtype)
    plan = _OutputPlan(
        target, fmt, tuple(axes), shape, chunk_map, out_dtype, record, "create", options.compression
    )
    if not exists(target):
        return plan
    if not is_zarr_store(target):
        raise OutputPathError(
            target,
            "something that is not a Zarr store exists at the output path, and srdvol "
            f"never deletes it (not even with {flag('overwrite')})",
            "choose another output path, or move that file or folder away yourself",
        )
    existing = read_provenance(target)
    if options.overwrite:
        return replace(plan, action="replace")
    if existing is None or existing.get("run_id") != record["run_id"]:
        owner, fix = "and is not a srdvol output", ""
        if existing is not None:
            differences = "; ".join(record_differences(existing, record))
            written = f": written with {differences}" if differences else ""
            owner = f"from another srdvol run (run_id {existing.get('run_id')}{written})"
            # a changed option (or default) is the usual reason an interrupted run is refused
            fix = "to resume it, rerun with the options it was written with; otherwise "
        raise OutputExistsError(
            target,
            f"the output already exists {owner}",
            f"{fix}choose another output path or pass {flag('overwrite')} to replace it",
        )
    array = open_output_array(target)
    if tuple(array.shape) != tuple(shape.values()) or np.dtype(array.dtype) != out_dtype:
        raise OutputExistsError(
            target,
            f"an output of this run exists with shape {array.shape} and dtype "
            f"{array.dtype}, not {tuple(shape.values())} and {out_dtype}",
            f"pass {flag('overwrite')} to replace it",
        )
    return replace(plan, action="resume")


def _write_new(plan: _OutputPlan, *, like: xr.DataArray, name: str) -> None:
    """Create group, ``s0`` and metadata; provenance goes last so it marks a complete creation."""
    fmt = plan.fmt
    group = zarr.open_group(plan.target, mode="w-", zarr_format=fmt.zarr_format)
    group.create_array(
        level_path(0),
        shape=tuple(plan.shape.values()),
        chunks=tuple(plan.chunks.values()),
        dtype=plan.dtype,
        fill_value=0,
        **fmt.array_kwargs(plan.axes, compression=plan.compression),
    )
    scale = [float(like.attrs.get("scale", {}).get(a, 1.0)) for a in plan.axes]
    translation = [float(like.attrs.get("translation", {}).get(a, 0.0)) for a in plan.axes]
    multiscale = fmt.new_multiscale(
        axes=axes_metadata(plan.axes, like.attrs.get("axes_units")),
        datasets=level_datasets(plan.axes, scale=scale, translation=translation, levels=1),
        name=name,
    )
    fmt.write_image(group, multiscale, omero=omero_hints(like, dtype=plan.dtype, name=name))
    group.attrs[PROVENANCE_KEY] = plan.record


def open_output_array(path: str | os.PathLike[str], *, level: int = 0) -> zarr.Array:
    """Open one level of an output image for writing (``mode="r+"``).

    Workers call this with the output path (a string travels cheaply to every worker) and write
    whole chunks of the returned array.

    Raises
    ------
    InputError
        If ``path`` is not an OME-Zarr image, or has no such level.
    """
    target = os.fspath(path)
    try:
        group = zarr.open_group(target, mode="r+")
        _, multiscale = read_multiscale(group, target)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:  # InputError too
        reason = err.problem if isinstance(err, InputError) else str(err)
        raise InputError(
            target,
            f"this is not an OME-Zarr image created by srdvol ({reason})",
            "create it first with srdvol.ngff.write.create_output",
        ) from err
    return group[level_dataset(multiscale, level, target).path]
