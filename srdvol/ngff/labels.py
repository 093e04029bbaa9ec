"""NGFF label images: cell masks stored beside an image, under ``IMAGE/labels/NAME``.

``srdvol simulate`` stores the cells of its ground truth this way, and ``srdvol evaluate``
reads them back for trace correlations. Both NGFF versions are handled by the image's format
object, and the metadata goes through ome-zarr-models' ``Labels`` / ``ImageLabel`` models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import zarr

from srdvol.axes import axis_type
from srdvol.errors import InputError
from srdvol.ngff.formats import detect_format, detect_labels_format
from srdvol.ngff.metadata import read_multiscale

__all__ = ["read_masks", "write_labels"]

_LABELS = "labels"


def write_labels(
    path: str | os.PathLike[str],
    data: np.ndarray,
    *,
    name: str,
    axes: Sequence[str],
    scale: Sequence[float],
    units: Mapping[str, str] | None = None,
) -> None:
    """Store an integer label image at ``PATH/labels/NAME`` (one level, ``s0``).

    The ``labels`` group lists it (beside any labels already listed); its metadata names the
    image as its source. A label image of the same name is replaced.

    Parameters
    ----------
    path
        An OME-Zarr image written by srdvol (its NGFF version is used for the labels).
    data
        Integer labels, 0 for background.
    name
        The label image's name (``"cells"``).
    axes
        Axis names of ``data`` (space axes: ``zyx`` or ``yx``).
    scale
        Pixel size per axis, as the image's.
    units
        Axis name -> unit.

    Raises
    ------
    InputError
        If ``path`` is not an OME-Zarr image, or ``data`` is not integer.
    """
    source = os.fspath(path)
    if not np.issubdtype(data.dtype, np.integer):
        raise InputError(source, f"labels of dtype {data.dtype} are not integer", "give integers")
    root = zarr.open_group(source, mode="r+")
    fmt = detect_format(root.attrs.asdict())
    if fmt is None:
        raise InputError(
            source, "labels need an OME-Zarr image to live in", "create the image first"
        )
    group = root.require_group(_LABELS)
    attrs = group.attrs.asdict()
    listed = fmt.read_labels(attrs, subject=source) if detect_labels_format(attrs) else []
    fmt.write_labels(group, [*listed, *([name] if name not in listed else [])])
    image = group.require_group(name)
    image.create_array(
        "s0",
        shape=data.shape,
        dtype=data.dtype,
        chunks=data.shape,
        overwrite=True,
        **fmt.layout_kwargs(axes),
    )[...] = data
    units = units or {}
    multiscale = fmt.new_multiscale(
        axes=[(a, axis_type(a), units.get(a)) for a in axes],
        datasets=[("s0", scale, None)],
        name=name,
    )
    fmt.write_image_label(image, multiscale, source="../../")


def read_masks(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The first label image under ``PATH/labels`` (NGFF image-label), or ``None``.

    Parameters
    ----------
    path
        An OME-Zarr image group, such as the truth written by
        :func:`srdvol.simulate.scene.simulate`.

    Raises
    ------
    InputError
        If the labels' metadata does not validate.
    """
    source = os.fspath(path)
    try:
        group = zarr.open_group(source, mode="r")[_LABELS]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    attrs = group.attrs.asdict() if isinstance(group, zarr.Group) else {}
    fmt = detect_labels_format(attrs)
    if fmt is None:
        return None
    names = fmt.read_labels(attrs, subject=f"{source.rstrip('/')}/{_LABELS}")
    if not names:
        return None
    image = group[names[0]]
    _, multiscale = read_multiscale(image, f"{source.rstrip('/')}/{_LABELS}/{names[0]}")
    return np.asarray(image[multiscale.datasets[0].path][...])
