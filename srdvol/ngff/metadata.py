"""What an image's NGFF metadata says about one level: axes, units, scale, translation.

The metadata is validated by ome-zarr-models (through the version objects of
:mod:`srdvol.ngff.formats`); this module turns the validated ``Multiscale`` model into srdvol's
terms: canonical axis names (``t c z y x``), one scale and translation per axis (the level's
transforms composed with the multiscale-wide one) and the level's array path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zarr
from ome_zarr_models.common.coordinate_transformations import (
    PathScale,
    PathTranslation,
    VectorScale,
    VectorTranslation,
)

from srdvol.axes import axis_type, parse_axes, validate_axes
from srdvol.errors import InputError, flag
from srdvol.ngff.formats import NgffFormat, detect_format

__all__ = [
    "LevelMetadata",
    "axes_for",
    "axes_metadata",
    "level_dataset",
    "level_transform",
    "read_image_metadata",
    "read_multiscale",
]


@dataclass(frozen=True)
class LevelMetadata:
    """One level of an image, as its metadata describes it.

    Attributes
    ----------
    axes
        Canonical axis names in storage order.
    units
        Axis name -> unit (``None`` when the metadata gives none).
    scale, translation
        Axis name -> physical size of a pixel, and position of pixel 0.
    version
        NGFF version of the metadata (``None`` for a plain Zarr array).
    levels
        Number of levels of the multiscale.
    array_path
        Path of the level's array inside the store (``""`` for a plain array).
    """

    axes: tuple[str, ...]
    units: dict[str, str | None] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    translation: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    levels: int = 1
    array_path: str = ""

    @classmethod
    def plain(cls, axes: tuple[str, ...]) -> LevelMetadata:
        """A plain Zarr array: pixel units, no metadata."""
        return cls(
            axes,
            units=dict.fromkeys(axes),
            scale=dict.fromkeys(axes, 1.0),
            translation=dict.fromkeys(axes, 0.0),
        )


def read_image_metadata(
    group: zarr.Group, source: str, *, level: int = 0, axes: str | None = None
) -> LevelMetadata:
    """Read and validate an image group's multiscales metadata for one level.

    Parameters
    ----------
    group
        The OME-Zarr image group.
    source
        Its path or URL, named in errors.
    level
        The level to describe.
    axes
        Axis names that override those of the metadata (same number of axes).

    Returns
    -------
    LevelMetadata

    Raises
    ------
    InputError
        No multiscales, metadata that does not validate (as NGFF 0.4 or 0.5), a level out of
        range, axes without t, y or x, or transforms stored in separate files.
    """
    fmt, multiscale = read_multiscale(group, source)
    dataset = level_dataset(multiscale, level, source)
    ndim = len(multiscale.axes)
    names = axes_for(axes, ndim, source) if axes is not None else _names(multiscale.axes, source)
    scale, translation = _compose(dataset.coordinateTransformations, ndim, source)
    top_scale, top_shift = _compose(multiscale.coordinateTransformations, ndim, source)
    # The multiscale-wide transform applies after the level's: x -> top(level(x)).
    scale = [s * ts for s, ts in zip(scale, top_scale, strict=True)]
    translation = [t * ts + tt for t, ts, tt in zip(translation, top_scale, top_shift, strict=True)]
    return LevelMetadata(
        names,
        units={n: _unit(a) for n, a in zip(names, multiscale.axes, strict=True)},
        scale=dict(zip(names, scale, strict=True)),
        translation=dict(zip(names, translation, strict=True)),
        version=fmt.version,
        levels=len(multiscale.datasets),
        array_path=dataset.path,
    )


def level_dataset(multiscale: Any, level: int, source: str) -> Any:
    """The ``Dataset`` model of one level.

    Raises
    ------
    InputError
        If the multiscale has no such level.
    """
    datasets = multiscale.datasets
    if not 0 <= level < len(datasets):
        raise InputError(
            source,
            f"level {level} does not exist (the image has levels 0 to {len(datasets) - 1})",
            f"pass {flag('level')} between 0 and {len(datasets) - 1}",
        )
    return datasets[level]


def _names(axes: Sequence[Any], source: str) -> tuple[str, ...]:
    """srdvol's names of NGFF ``Axis`` models: type time -> ``t``, channel -> ``c``, space
    axes by their (lower-case) name; names such as ``time`` or ``ch`` are understood too."""
    names = []
    for axis in axes:
        name = str(axis.name).lower()
        if axis.type == "time" or name in {"t", "time"}:
            names.append("t")
        elif axis.type == "channel" or name in {"c", "ch", "channel"}:
            names.append("c")
        else:
            names.append(name)
    try:
        return validate_axes(names, subject=source)
    except InputError as err:
        raise InputError(
            source,
            err.problem,
            f"{err.fix}; {flag('axes')} also overrides the metadata's axis names",
        ) from err


def axes_metadata(
    axes: Sequence[str], units: Mapping[str, Any] | None = None
) -> list[tuple[str, str, str | None]]:
    """``(name, type, unit)`` of canonical axes, for :meth:`NgffFormat.new_multiscale`.

    Channels carry no unit; other axes carry theirs when ``units`` gives one.
    """
    units = units or {}
    return [(a, axis_type(a), str(units[a]) if units.get(a) and a != "c" else None) for a in axes]


def level_transform(multiscale: Any, level: int = 0) -> tuple[list[float], list[float]]:
    """(scale, translation) of one dataset of a srdvol output, as stored (not composed)."""
    ndim = len(multiscale.axes)
    return _compose(multiscale.datasets[level].coordinateTransformations, ndim, "")


def read_multiscale(group: zarr.Group, source: str) -> tuple[NgffFormat, Any]:
    """The format and the validated first ``Multiscale`` model of an image group.

    Raises
    ------
    InputError
        If the group holds no multiscales metadata, or metadata that does not validate.
    """
    attrs = group.attrs.asdict()
    fmt = detect_format(attrs)
    if fmt is None:
        arrays = sorted(group.array_keys())
        hint = f" (it holds the arrays {', '.join(arrays)})" if arrays else ""
        raise InputError(
            source,
            f"this Zarr group has no OME-Zarr multiscales metadata{hint}",
            "point at the array inside it and pass the axis order, for example "
            f"{source.rstrip('/')}/{arrays[0] if arrays else '0'} with {flag('axes')}=tzyx",
        )
    return fmt, fmt.read_multiscale(attrs, subject=source)


def axes_for(spec: str, ndim: int, source: str) -> tuple[str, ...]:
    """Axis names given by the user (``"tzyx"``), checked against the array's dimensions."""
    names = parse_axes(spec, subject=source)
    if len(names) != ndim:
        raise InputError(
            source,
            f"{flag('axes')} {''.join(names)} names {len(names)} axes but the array has {ndim}",
            f"give exactly {ndim} axis letters",
        )
    return names


def _unit(axis: Any) -> str | None:
    return str(axis.unit) if axis.unit else None


def _compose(
    transforms: Sequence[Any] | None, ndim: int, source: str
) -> tuple[list[float], list[float]]:
    """Compose validated scale/translation models into one per-axis scale and translation."""
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    for item in transforms or ():
        if isinstance(item, PathScale | PathTranslation):
            where = getattr(item, "path", None) or getattr(item, "translation", "")
            raise InputError(
                source,
                f"a {item.type} transform stored in a separate file ({where}) is not supported",
                "write the transform inline in the multiscales metadata",
            )
        if isinstance(item, VectorScale):
            scale = [s * v for s, v in zip(scale, item.scale, strict=True)]
            translation = [t * v for t, v in zip(translation, item.scale, strict=True)]
        elif isinstance(item, VectorTranslation):
            translation = [t + v for t, v in zip(translation, item.translation, strict=True)]
    return scale, translation
