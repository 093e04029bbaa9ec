"""Create the output OME-Zarr image, decide resume or refusal, and build its viewing pyramid.

The client creates everything that is metadata (group, level-0 array ``s0``, NGFF multiscales,
omero rendering hints, srdvol provenance) *once*, before any worker runs; workers only write
whole chunks of ``s0`` (see :func:`open_output_array`). :func:`write_pyramid` then derives
``s1, s2, ...`` (2x mean in y and x) with dask, each task writing whole chunks of one level, and
finally the client rewrites the multiscales metadata.

Defaults (documented here because users see them in their files):

- chunks: 1 along ``c`` and ``z``; up to 512 along ``y`` and ``x`` (a 512x512 frame is one
  chunk, what a viewer loads per tile); along ``t`` the largest power of two up to 16 that keeps
  a chunk at or below 4 MiB uncompressed (4 frames for 512x512 float32). Small along ``t`` so
  scrolling frames in napari, or reading a few frames for the next analysis, decompresses
  little data.
- compression: blosc-zstd, level 3, bit-shuffle (fast, and float32 noise-reduced data compresses
  well with bit-shuffle).
- omero window: 0.1 and 99.9 percentiles of one storage chunk of the input in the middle of the
  recording (output is in input intensity units); min/max are the dtype range for integers, the
  sample range for floats. Falls back to the dtype range when the sample has no finite values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from srdvol.axes import axis_type, validate_axes
from srdvol.errors import ConfigError, InputError, OutputExistsError, OutputPathError

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
    "output_nbytes",
    "pyramid_shapes",
    "read_provenance",
    "write_pyramid",
]

#: Target uncompressed chunk size used to pick the default chunk length along t.
CHUNK_BYTES = 4 * 2**20
#: NGFF versions srdvol writes: 0.5 on Zarr v3 (default), 0.4 on Zarr v2 for older readers.
NGFF_VERSIONS = ("0.5", "0.4")
_PLANE_CHUNK = 512
_MAX_T_CHUNK = 16
_LEVEL0 = "s0"
_PROVENANCE_KEY = "srdvol"


def _ome_writer() -> Any:
    """Import ome-zarr's writer; 0.18 warns at import time about its own deprecated Scaler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr import format as ome_format
        from ome_zarr import writer
    return writer, ome_format


# --------------------------------------------------------------------------------------------
# paths


def _location(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(protocol, normalised path) of a local path or fsspec URL, for comparing locations."""
    from srdvol.ngff.remote import filesystem

    text = os.fspath(path)
    fs, root = filesystem(text)  # a missing fsspec backend is one sentence
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "file", os.path.realpath(root)
    return protocol, root.rstrip("/")


def check_output_path(
    output: str | os.PathLike[str],
    input: str | os.PathLike[str],
    *,
    keep: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Refuse an output that is the input, lies inside it, or contains it or a file to keep.

    Run this before any work: writing inside the input store would modify it, and replacing an
    output that contains the input or the model (``--overwrite``) would delete them.

    Parameters
    ----------
    output, input
        The output and input locations (local paths or fsspec URLs).
    keep
        Other files that must survive the run, such as the model file (and its training
        state): the output may neither be one of them nor a folder that holds one.

    Raises
    ------
    OutputPathError
        If the output and the input are the same or one lies inside the other, or the output is
        or holds a file of ``keep``.
    """
    out_proto, out_path = _location(output)
    in_proto, in_path = _location(input)
    problem = None
    if out_proto == in_proto:
        if out_path == in_path:
            problem = f"the output is the input image {os.fspath(input)}"
        elif out_path.startswith(in_path + "/"):
            problem = f"the output lies inside the input image {os.fspath(input)}"
        elif in_path.startswith(out_path + "/"):
            problem = f"the output contains the input image {os.fspath(input)}"
    if problem is not None:
        raise OutputPathError(
            output, problem, "choose an output path outside the input, for example next to it"
        )
    for item in keep:
        proto, path = _location(item)
        if proto != out_proto:
            continue
        if path == out_path:
            problem = f"the output is the model file {os.fspath(item)}"
        elif path.startswith(out_path + "/"):
            problem = f"the output is a folder that holds the model file {os.fspath(item)}"
        else:
            continue
        raise OutputPathError(
            output,
            problem,
            "choose an output path of its own, for example out.zarr next to the model "
            "(replacing it would delete the model)",
        )


def _is_zarr_store(path: str) -> bool:
    """Whether a location holds Zarr metadata at its root (what --overwrite may replace)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    names = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
    return any(fs.exists(f"{root.rstrip('/')}/{name}") for name in names)


def _exists(path: str) -> bool:
    """Whether something is at ``path`` (an empty folder, made ready by the user, is not)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return False
    return not (fs.isdir(root) and not fs.ls(root, detail=False))


def _remove(path: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    fs.rm(root, recursive=True)


# --------------------------------------------------------------------------------------------
# provenance


def make_run_id(provenance: Mapping[str, Any]) -> str:
    """Deterministic run identifier: a short SHA-256 of the provenance's JSON.

    The same input, parameters and model give the same id, so a rerun of a killed command finds
    its own output and resumes it. Keys ``run_id`` and ``created`` are ignored.
    """
    content = {k: v for k, v in provenance.items() if k not in ("run_id", "created")}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``srdvol`` provenance attribute of an output, or ``None`` (not a srdvol output)."""
    try:
        group = zarr.open_group(os.fspath(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None
    value = group.attrs.get(_PROVENANCE_KEY)
    return dict(value) if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------------
# chunks


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
            "--chunks",
            f"names axes {unknown} that the image does not have (it has {''.join(shape)})",
            f"give chunk lengths for the axes {''.join(shape)} only",
        )
    bad = {a: n for a, n in chunks.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise ConfigError("--chunks", f"chunk lengths {bad} are not positive", "use lengths >= 1")
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


# --------------------------------------------------------------------------------------------
# creation


def create_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    dtype: Any = "float32",
    chunks: Mapping[str, int] | None = None,
    ngff: str = "0.5",
    provenance: Mapping[str, Any],
    overwrite: bool = False,
    name: str = "denoised",
    keep: Sequence[str | os.PathLike[str]] = (),
) -> zarr.Array:
    """Create (or reopen for resume) the output image and return its writable level-0 array.

    Everything is validated before anything is written: the path against the input, the NGFF
    version, the dtype and the chunks, then what already exists at ``path``.

    Parameters
    ----------
    path
        Local path or fsspec URL of the output OME-Zarr image.
    like
        The input image as returned by :func:`srdvol.ngff.read.open_image`: its dims, shape, scale,
        units and translation are copied; ``attrs["source"]`` is the input path.
    dtype
        Output dtype (``float32`` by default; integer or real float).
    chunks
        Axis name -> chunk length overrides (see :func:`output_chunks`).
    ngff
        ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
    provenance
        Run parameters to record under the ``srdvol`` attribute. A ``run_id`` is derived from it
        with :func:`make_run_id` unless given; srdvol's version, the input path and the creation
        time are added.
    overwrite
        Replace an existing output that belongs to another run (or is not a srdvol output).

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
        Unknown NGFF version, unsupported dtype, bad chunks.
    """
    plan = _plan_output(
        path,
        like=like,
        dtype=dtype,
        chunks=chunks,
        ngff=ngff,
        provenance=provenance,
        overwrite=overwrite,
        keep=keep,
    )
    if plan.action == "resume":
        return open_output_array(plan.target)
    if plan.action == "replace":
        _remove(plan.target)
    _write_new(
        plan.target,
        like=like,
        axes=plan.axes,
        shape=plan.shape,
        chunks=plan.chunks,
        dtype=plan.dtype,
        ngff=ngff,
        record=plan.record,
        name=name,
    )
    return open_output_array(plan.target)


def check_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    dtype: Any = "float32",
    chunks: Mapping[str, int] | Sequence[int] | None = None,
    ngff: str = "0.5",
    provenance: Mapping[str, Any],
    overwrite: bool = False,
    keep: Sequence[str | os.PathLike[str]] = (),
) -> str:
    """Run every check :func:`create_output` runs, and write nothing.

    Callers use it to refuse a bad output before slow work (training, starting a cluster).

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
        path,
        like=like,
        dtype=dtype,
        chunks=chunks,
        ngff=ngff,
        provenance=provenance,
        overwrite=overwrite,
        keep=keep,
    ).action


@dataclass(frozen=True)
class _OutputPlan:
    target: str
    axes: tuple[str, ...]
    shape: dict[str, int]
    chunks: dict[str, int]
    dtype: np.dtype
    record: dict[str, Any]
    action: str


def _plan_output(
    path: str | os.PathLike[str],
    *,
    like: xr.DataArray,
    dtype: Any,
    chunks: Mapping[str, int] | Sequence[int] | None,
    ngff: str,
    provenance: Mapping[str, Any],
    overwrite: bool,
    keep: Sequence[str | os.PathLike[str]] = (),
) -> _OutputPlan:
    """Validate an output request against the input and what exists; decide what to do."""
    target = os.fspath(path)
    source = like.attrs.get("source")
    if source:
        check_output_path(target, source, keep=keep)
    if ngff not in NGFF_VERSIONS:
        raise ConfigError(
            "--ngff", f"NGFF version {ngff!r} is not supported", "use --ngff 0.5 or --ngff 0.4"
        )
    out_dtype = np.dtype(dtype)
    if out_dtype.kind not in "iuf":
        raise ConfigError(
            "--dtype",
            f"output dtype {out_dtype} is not an integer or real float",
            "use --dtype float32 or --dtype input",
        )
    axes = validate_axes([str(d) for d in like.dims], subject=source or target)
    shape = {a: int(n) for a, n in zip(axes, like.shape, strict=True)}
    chunk_map = output_chunks(shape, dtype=out_dtype, chunks=chunks)
    record = _provenance(provenance, like=like, ngff=ngff, dtype=out_dtype)

    action = "create"
    if _exists(target):
        if not _is_zarr_store(target):
            raise OutputPathError(
                target,
                "something that is not a Zarr store exists at the output path, and srdvol "
                "never deletes it (not even with --overwrite)",
                "choose another output path, or move that file or folder away yourself",
            )
        existing = read_provenance(target)
        if existing is not None and existing.get("run_id") == record["run_id"] and not overwrite:
            array = open_output_array(target)
            if tuple(array.shape) != tuple(shape.values()) or np.dtype(array.dtype) != out_dtype:
                raise OutputExistsError(
                    target,
                    f"an output of this run exists with shape {array.shape} and dtype "
                    f"{array.dtype}, not {tuple(shape.values())} and {out_dtype}",
                    "pass --overwrite to replace it",
                )
            action = "resume"
        elif not overwrite:
            owner = (
                f"from another srdvol run (run_id {existing.get('run_id')})"
                if existing is not None
                else "and is not a srdvol output"
            )
            raise OutputExistsError(
                target,
                f"the output already exists {owner}",
                "choose another output path or pass --overwrite to replace it",
            )
        else:
            action = "replace"
    return _OutputPlan(target, tuple(axes), shape, chunk_map, out_dtype, record, action)


def _provenance(
    provenance: Mapping[str, Any], *, like: xr.DataArray, ngff: str, dtype: np.dtype[Any]
) -> dict[str, Any]:
    from srdvol import __version__

    record: dict[str, Any] = {
        "version": __version__,
        "input": like.attrs.get("source"),
        "input_level": like.attrs.get("level"),
        "input_channel": like.attrs.get("channel"),
        "dtype": str(dtype),
        "ngff": ngff,
    }
    record.update(json.loads(json.dumps(dict(provenance), default=str)))
    record["run_id"] = str(provenance.get("run_id") or make_run_id(record))
    record["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


def _compressor(zarr_format: int) -> Any:
    if zarr_format == 3:
        from zarr.codecs import BloscCodec

        return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def _array_kwargs(zarr_format: int, axes: tuple[str, ...]) -> dict[str, Any]:
    """create_array options shared by every level: codec, and the layout NGFF asks for."""
    if zarr_format == 3:
        return {"compressors": _compressor(3), "dimension_names": axes}
    # NGFF 0.4 requires "/" between chunk indices on Zarr v2.
    return {
        "compressors": _compressor(2),
        "chunk_key_encoding": {"name": "v2", "separator": "/"},
    }


def _write_new(
    target: str,
    *,
    like: xr.DataArray,
    axes: tuple[str, ...],
    shape: dict[str, int],
    chunks: dict[str, int],
    dtype: np.dtype[Any],
    ngff: str,
    record: dict[str, Any],
    name: str = "denoised",
) -> None:
    """Create group, ``s0`` and metadata; provenance goes last so it marks a complete creation."""
    zarr_format = 3 if ngff == "0.5" else 2
    group = zarr.open_group(target, mode="w-", zarr_format=zarr_format)
    group.create_array(
        _LEVEL0,
        shape=tuple(shape.values()),
        chunks=tuple(chunks.values()),
        dtype=dtype,
        fill_value=0,
        **_array_kwargs(zarr_format, axes),
    )
    scale = [float(like.attrs.get("scale", {}).get(a, 1.0)) for a in axes]
    translation = [float(like.attrs.get("translation", {}).get(a, 0.0)) for a in axes]
    units = dict(like.attrs.get("axes_units") or {})
    meta = {
        "axes": _axes_metadata(axes, units),
        "scale": scale,
        "translation": translation,
        "name": name,
    }
    _write_multiscales(group, meta, levels=1, ngff=ngff)
    _set_ome_attr(group, "omero", _omero(like, axes, dtype, name=name), ngff=ngff)
    group.attrs[_PROVENANCE_KEY] = record


def _axes_metadata(axes: tuple[str, ...], units: Mapping[str, Any]) -> list[dict[str, str]]:
    entries = []
    for axis in axes:
        entry = {"name": axis, "type": axis_type(axis)}
        if units.get(axis) and axis != "c":
            entry["unit"] = str(units[axis])
        entries.append(entry)
    return entries


def _write_multiscales(group: zarr.Group, meta: dict[str, Any], *, levels: int, ngff: str) -> None:
    """Write ``multiscales`` for levels ``s0..s{levels-1}`` with ome-zarr's writer.

    Level k has scale ``scale0 * 2**k`` in y and x and translation shifted by half of the
    pooled extent, ``(2**k - 1) / 2 * scale0``, so pixel centres stay in place.
    """
    writer, ome_format = _ome_writer()
    axes = [entry["name"] for entry in meta["axes"]]
    datasets = []
    for k in range(levels):
        factor = [2.0**k if a in ("y", "x") else 1.0 for a in axes]
        scale = [s * f for s, f in zip(meta["scale"], factor, strict=True)]
        shift = [
            t + (f - 1.0) / 2.0 * s
            for t, f, s in zip(meta["translation"], factor, meta["scale"], strict=True)
        ]
        datasets.append(
            {
                "path": f"s{k}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": shift},
                ],
            }
        )
    fmt = ome_format.FormatV05() if ngff == "0.5" else ome_format.FormatV04()
    writer.write_multiscales_metadata(
        group, datasets, fmt=fmt, axes=meta["axes"], name=meta["name"]
    )


def _set_ome_attr(group: zarr.Group, key: str, value: Any, *, ngff: str) -> None:
    """Set one NGFF key: under ``ome`` for 0.5, at the top level for 0.4."""
    if ngff == "0.5":
        ome = dict(group.attrs.get("ome", {}))
        ome[key] = value
        group.attrs["ome"] = ome
    else:
        group.attrs[key] = value


def _omero(
    like: xr.DataArray, axes: tuple[str, ...], dtype: np.dtype[Any], *, name: str = "denoised"
) -> dict[str, Any]:
    """Rendering hints: one grey channel per output channel, window from a cheap sample."""
    low, high, lo_range, hi_range = _window(like, dtype)
    n_channels = int(like.sizes.get("c", 1))
    first = like.attrs.get("channel") or 0
    channels = [
        {
            "label": f"{name} channel {first + i}",
            "color": "FFFFFF",
            "active": True,
            "window": {"start": low, "end": high, "min": lo_range, "max": hi_range},
        }
        for i in range(n_channels)
    ]
    mid_t = int(like.sizes["t"]) // 2
    return {
        "channels": channels,
        "rdefs": {
            "model": "greyscale",
            "defaultT": mid_t,
            "defaultZ": int(like.sizes.get("z", 1)) // 2,
        },
    }


def _window(like: xr.DataArray, dtype: np.dtype[Any]) -> tuple[float, float, float, float]:
    if np.dtype(like.dtype).kind in "iu":
        info = np.iinfo(like.dtype)
        lo_range, hi_range = float(info.min), float(info.max)
    else:
        lo_range, hi_range = 0.0, 1.0
    sample = _sample(like)
    finite = sample[np.isfinite(sample)] if sample is not None else np.empty(0)
    if finite.size == 0:
        return lo_range, hi_range, lo_range, hi_range
    low, high = (float(v) for v in np.percentile(finite, [0.1, 99.9]))
    if high <= low:
        high = low + 1.0
    if np.dtype(like.dtype).kind == "f":
        lo_range, hi_range = min(float(finite.min()), low), max(float(finite.max()), high)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo_range, hi_range = max(lo_range, float(info.min)), min(hi_range, float(info.max))
    return low, high, lo_range, hi_range


def _sample(like: xr.DataArray) -> np.ndarray | None:
    """One storage chunk at the middle frame of the first movie (cheap: one chunk read)."""
    data = like.data
    if not isinstance(data, da.Array):
        data = da.asarray(data)
    index = []
    for axis, sizes in zip(like.dims, data.chunks, strict=True):
        if axis == "t":
            bounds = np.cumsum((0, *sizes))
            index.append(int(np.searchsorted(bounds, like.sizes["t"] // 2, side="right")) - 1)
        else:
            index.append(0)
    try:
        block = np.asarray(data.blocks[tuple(index)].compute(scheduler="sync"), dtype=np.float64)
    except (OSError, ValueError):
        return None
    return block


# --------------------------------------------------------------------------------------------
# opening for writing


def _multiscale(group: zarr.Group) -> tuple[dict[str, Any], str]:
    """The first multiscale entry and the NGFF version of an output group."""
    attrs = dict(group.attrs)
    if isinstance(attrs.get("ome"), dict):
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    return attrs["multiscales"][0], str(attrs["multiscales"][0].get("version", "0.4"))


def open_output_array(path: str | os.PathLike[str], *, level: int = 0) -> zarr.Array:
    """Open one level of an output image for writing (``mode="r+"``).

    Workers call this with the output path (a string travels cheaply to every worker) and write
    whole chunks of the returned array.
    """
    target = os.fspath(path)
    try:
        group = zarr.open_group(target, mode="r+")
        multiscale, _ = _multiscale(group)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise InputError(
            target,
            f"this is not an OME-Zarr image created by srdvol ({err})",
            "create it first with srdvol.ngff.write.create_output",
        ) from err
    datasets = multiscale["datasets"]
    if not 0 <= level < len(datasets):
        raise InputError(
            target,
            f"level {level} does not exist (the output has {len(datasets)} levels)",
            f"pass a level between 0 and {len(datasets) - 1}",
        )
    return group[datasets[level]["path"]]


# --------------------------------------------------------------------------------------------
# pyramid


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
    multiscale, ngff = _multiscale(group)
    axes = tuple(entry["name"] for entry in multiscale["axes"])
    zarr_format = 3 if ngff == "0.5" else 2
    base = group[_LEVEL0]
    iy, ix = axes.index("y"), axes.index("x")
    previous = base
    paths = [_LEVEL0]
    for k, shape in enumerate(pyramid_shapes(base.shape, axes, min_size=min_size), start=1):
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, shape, strict=True))
        level = group.create_array(
            f"s{k}",
            shape=shape,
            chunks=chunks,
            dtype=base.dtype,
            fill_value=0,
            overwrite=True,
            **_array_kwargs(zarr_format, axes),
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
        paths.append(f"s{k}")
    meta = {
        "axes": multiscale["axes"],
        "scale": _level_transform(multiscale, "scale"),
        "translation": _level_transform(multiscale, "translation"),
        "name": multiscale.get("name", "denoised"),
    }
    _write_multiscales(group, meta, levels=len(paths), ngff=ngff)
    for stale in sorted(set(group.array_keys()) - set(paths)):
        if stale.startswith("s") and stale[1:].isdigit():
            del group[stale]
    return paths


def _level_transform(multiscale: Mapping[str, Any], kind: str) -> list[float]:
    ndim = len(multiscale["axes"])
    for item in multiscale["datasets"][0]["coordinateTransformations"]:
        if item["type"] == kind:
            return [float(v) for v in item[kind]]
    return [1.0 if kind == "scale" else 0.0] * ndim
