"""NGFF versions as objects: every difference between OME-Zarr 0.4 and 0.5 lives here.

Modelled on ome-zarr-py's ``FormatV04`` / ``FormatV05``: one object per version knows its Zarr
format, where the NGFF attributes live in a group (0.4: at the top of ``.zattrs``; 0.5: under
``ome`` in ``zarr.json``), where the version is written (0.4: in each multiscale; 0.5: once, in
``ome``), how its arrays are stored (0.4: Zarr v2, a numcodecs compressor and ``/`` between
chunk indices; 0.5: Zarr v3, a Blosc codec, ``dimension_names``) and which ome-zarr-models
classes describe its metadata. Metadata is read and written through those pydantic models, never
parsed by hand; metadata that does not validate is reported as one :class:`InputError`.

Everything else in :mod:`srdvol.ngff` asks the format object instead of comparing versions::

    fmt = format_for("0.4")
    group = zarr.open_group(path, mode="w-", zarr_format=fmt.zarr_format)
    group.create_array("s0", shape=..., **fmt.array_kwargs(("t", "y", "x")))
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import zarr
from ome_zarr_models.common.omero import Omero
from ome_zarr_models.v04 import axes as axes04
from ome_zarr_models.v04 import image as image04
from ome_zarr_models.v04 import image_label as label04
from ome_zarr_models.v04 import labels as labels04
from ome_zarr_models.v04 import multiscales as multiscales04
from ome_zarr_models.v05 import axes as axes05
from ome_zarr_models.v05 import image as image05
from ome_zarr_models.v05 import image_label as label05
from ome_zarr_models.v05 import labels as labels05
from ome_zarr_models.v05 import multiscales as multiscales05
from pydantic import BaseModel, ValidationError

from srdvol.errors import ConfigError, InputError, flag
from srdvol.values import DEFAULT_COMPRESSION

__all__ = [
    "FORMATS",
    "FormatV04",
    "FormatV05",
    "NgffFormat",
    "detect_format",
    "detect_labels_format",
    "format_for",
]

#: The NGFF 0.4 keys srdvol reads and writes, at the top level of a group's attributes.
_V04_KEYS = ("multiscales", "omero", "labels", "image-label")
#: Blosc settings of every array srdvol writes (fast, and bit-shuffle suits float32 data).
_CNAME = "zstd"


class NgffFormat(ABC):
    """One NGFF version: its Zarr storage, where its metadata lives, and its models.

    Subclasses set the class attributes and say where the metadata and its version key live
    (the abstract methods); reading, building and writing metadata is the same for every
    version.
    """

    #: The NGFF version string, as written in the metadata.
    version: ClassVar[str]
    #: The Zarr format its stores use.
    zarr_format: ClassVar[int]
    #: ome-zarr-models classes of this version.
    axis_model: ClassVar[type[BaseModel]]
    dataset_model: ClassVar[type[BaseModel]]
    multiscale_model: ClassVar[type[BaseModel]]
    image_model: ClassVar[type[BaseModel]]
    labels_model: ClassVar[type[BaseModel]]
    image_label_model: ClassVar[type[BaseModel]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- where metadata lives

    @abstractmethod
    def ome_attributes(self, attrs: Mapping[str, Any]) -> dict[str, Any] | None:
        """The mapping of a group's attributes that holds this version's NGFF keys, or ``None``."""

    @abstractmethod
    def stored_version(self, ome: Mapping[str, Any]) -> str | None:
        """The version the metadata declares (``None`` when it declares none)."""

    @abstractmethod
    def _versioned(self, ome: Mapping[str, Any]) -> dict[str, Any]:
        """``ome`` with this version written where the version key belongs."""

    @abstractmethod
    def _store(self, group: zarr.Group, ome: dict[str, Any]) -> None:
        """Write the NGFF keys ``ome`` into the group's attributes (other keys are kept)."""

    # ---------------------------------------------------------------- arrays

    @abstractmethod
    def layout_kwargs(self, axes: Sequence[str]) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` that this version requires: the
        chunk key encoding, and the dimension names where the format has them.

        Parameters
        ----------
        axes
            Axis names in storage order.
        """

    @abstractmethod
    def compressor(self, level: int = DEFAULT_COMPRESSION) -> Any:
        """srdvol's compressor (blosc-zstd at ``level``, bit-shuffle) in this version's terms;
        ``None`` for level 0 (no compression)."""

    def array_kwargs(
        self, axes: Sequence[str], *, compression: int = DEFAULT_COMPRESSION
    ) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` for every image level: the layout
        (:meth:`layout_kwargs`) and srdvol's compressor.

        Parameters
        ----------
        axes
            Axis names in storage order.
        compression
            blosc-zstd level, 1 (fast) to 9 (small); 0 stores the chunks uncompressed.
        """
        codec = self.compressor(compression) if compression else None
        return {"compressors": codec, **self.layout_kwargs(axes)}

    # ---------------------------------------------------------------- reading

    def read_multiscale(self, attrs: Mapping[str, Any], *, subject: str) -> Any:
        """The first multiscale of a group's attributes, validated by ome-zarr-models.

        Parameters
        ----------
        attrs
            The group's attributes.
        subject
            The store, named in errors.

        Returns
        -------
        ome_zarr_models Multiscale
            This version's ``Multiscale`` model (``axes``, ``datasets`` with their
            ``coordinateTransformations``, the optional global transform, ``name``).

        Raises
        ------
        InputError
            If the metadata declares another NGFF version, lists no multiscale, or does not
            validate.
        """
        ome = self.ome_attributes(attrs) or {}
        declared = self.stored_version(ome)
        if declared is not None and declared != self.version:
            raise InputError(
                subject,
                f"the image declares NGFF version {declared}, which srdvol does not read "
                f"(it reads {' and '.join(sorted(FORMATS))})",
                "convert the image to NGFF 0.4 or 0.5 (for example with ome-zarr-py), or point "
                f"at its array and pass the axis order, for example {flag('axes')}=tzyx",
            )
        multiscales = ome.get("multiscales")
        first = multiscales[0] if isinstance(multiscales, list) and multiscales else None
        return self._validate(self.multiscale_model, first, subject=subject, what="multiscales")

    def read_labels(self, attrs: Mapping[str, Any], *, subject: str) -> list[str]:
        """The label paths a ``labels`` group lists, validated by ome-zarr-models."""
        ome = self._versioned(self.ome_attributes(attrs) or {})
        return list(self._validate(self.labels_model, ome, subject=subject, what="labels").labels)

    # ---------------------------------------------------------------- writing

    def new_multiscale(
        self,
        *,
        axes: Sequence[tuple[str, str, str | None]],
        datasets: Sequence[tuple[str, Sequence[float], Sequence[float] | None]],
        name: str,
    ) -> Any:
        """Build a validated ``Multiscale`` model.

        Parameters
        ----------
        axes
            ``(name, type, unit)`` per axis in storage order; ``unit`` may be ``None``.
        datasets
            ``(path, scale, translation)`` per level, full resolution first (``translation``
            ``None``: a scale transform only).
        name
            The image name.
        """
        fields: dict[str, Any] = {
            "axes": [
                self.axis_model(name=n, type=kind, **({"unit": unit} if unit else {}))
                for n, kind, unit in axes
            ],
            "datasets": [
                self.dataset_model.build(
                    path=path,
                    scale=list(scale),
                    translation=None if shift is None else list(shift),
                )
                for path, scale, shift in datasets
            ],
            "name": name,
        }
        return self.multiscale_model(**self._multiscale_version(fields))

    def _multiscale_version(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The multiscale's fields, with the version where this version writes it."""
        return fields

    def write_image(
        self,
        group: zarr.Group,
        multiscale: Any,
        *,
        omero: Mapping[str, Any] | None = None,
    ) -> None:
        """Write image metadata: ``multiscales`` (replacing any), and ``omero`` when given.

        The other NGFF keys of the group (for example its existing ``omero``) are kept. The
        whole image attributes are validated by ome-zarr-models before anything is written.

        Parameters
        ----------
        group
            The image group, opened for writing.
        multiscale
            A model from :meth:`new_multiscale`.
        omero
            Rendering hints (validated with ome-zarr-models' ``Omero``).
        """
        subject = str(group.store_path)
        ome = dict(self.ome_attributes(group.attrs.asdict()) or {})
        ome["multiscales"] = [multiscale]
        if omero is not None:
            self._validate(Omero, omero, subject=subject, what="omero")
            ome["omero"] = dict(omero)
        self._store(group, self._dump(self.image_model, ome, subject=subject))

    def write_labels(self, group: zarr.Group, names: Sequence[str]) -> None:
        """Write a ``labels`` group's metadata: the paths of its label images."""
        ome = {"labels": list(names)}
        self._store(group, self._dump(self.labels_model, ome, subject=str(group.store_path)))

    def write_image_label(self, group: zarr.Group, multiscale: Any, *, source: str) -> None:
        """Write a label image's metadata: its ``multiscales`` and ``image-label`` (the
        relative path of the image it labels)."""
        ome = {
            "multiscales": [multiscale],
            "image-label": {"version": self.version, "source": {"image": source}},
        }
        self._store(group, self._dump(self.image_label_model, ome, subject=str(group.store_path)))

    # ---------------------------------------------------------------- models

    def _dump(self, model: type[BaseModel], ome: Mapping[str, Any], *, subject: str) -> dict:
        """Validate ``ome`` (plus the version key) with ``model``; return it as JSON data."""
        valid = self._validate(model, self._versioned(ome), subject=subject, what="NGFF")
        # Unset optional fields stay out (as in the file read); set ones are written as given.
        return valid.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def _validate(self, model: type[BaseModel], data: Any, *, subject: str, what: str) -> Any:
        """``model.model_validate(data)``; a validation failure becomes one InputError."""
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise _invalid(err, subject=subject, version=self.version, what=what) from None


class FormatV04(NgffFormat):
    """NGFF 0.4 on Zarr v2: NGFF keys at the top of ``.zattrs``, the version in each
    multiscale, numcodecs Blosc, ``/`` between chunk indices (NGFF 0.4 requires it)."""

    version = "0.4"
    zarr_format = 2
    axis_model = axes04.Axis
    dataset_model = multiscales04.Dataset
    multiscale_model = multiscales04.Multiscale
    image_model = image04.ImageAttrs
    labels_model = labels04.LabelsAttrs
    image_label_model = label04.ImageLabelAttrs

    def ome_attributes(self, attrs: Mapping[str, Any]) -> dict[str, Any] | None:
        ome = {key: attrs[key] for key in _V04_KEYS if key in attrs}
        return ome or None

    def stored_version(self, ome: Mapping[str, Any]) -> str | None:
        multiscales = ome.get("multiscales")
        if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict):
            version = multiscales[0].get("version")
            return None if version is None else str(version)
        return None

    def _versioned(self, ome: Mapping[str, Any]) -> dict[str, Any]:
        return dict(ome)

    def _multiscale_version(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "version": self.version}

    def _store(self, group: zarr.Group, ome: dict[str, Any]) -> None:
        group.attrs.update(ome)

    def layout_kwargs(self, axes: Sequence[str]) -> dict[str, Any]:
        return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}

    def compressor(self, level: int = DEFAULT_COMPRESSION) -> Any:
        from numcodecs import Blosc

        return Blosc(cname=_CNAME, clevel=level, shuffle=Blosc.BITSHUFFLE)


class FormatV05(NgffFormat):
    """NGFF 0.5 on Zarr v3: NGFF keys under ``ome`` in ``zarr.json`` with one ``version``,
    the Blosc codec, ``dimension_names`` on every array (the axis names)."""

    version = "0.5"
    zarr_format = 3
    axis_model = axes05.Axis
    dataset_model = multiscales05.Dataset
    multiscale_model = multiscales05.Multiscale
    image_model = image05.ImageAttrs
    labels_model = labels05.LabelsAttrs
    image_label_model = label05.ImageLabelAttrs

    def ome_attributes(self, attrs: Mapping[str, Any]) -> dict[str, Any] | None:
        ome = attrs.get("ome")
        return dict(ome) if isinstance(ome, Mapping) else None

    def stored_version(self, ome: Mapping[str, Any]) -> str | None:
        version = ome.get("version")
        return None if version is None else str(version)

    def _versioned(self, ome: Mapping[str, Any]) -> dict[str, Any]:
        return {"version": self.version, **ome}

    def _store(self, group: zarr.Group, ome: dict[str, Any]) -> None:
        group.attrs["ome"] = ome

    def layout_kwargs(self, axes: Sequence[str]) -> dict[str, Any]:
        return {
            "chunk_key_encoding": {"name": "default", "separator": "/"},
            "dimension_names": tuple(axes),
        }

    def compressor(self, level: int = DEFAULT_COMPRESSION) -> Any:
        from zarr.codecs import BloscCodec

        return BloscCodec(cname=_CNAME, clevel=level, shuffle="bitshuffle")


#: The versions srdvol reads and writes, newest first (the first is the default output).
FORMATS: dict[str, NgffFormat] = {fmt.version: fmt for fmt in (FormatV05(), FormatV04())}


def format_for(version: Any) -> NgffFormat:
    """The format object of an NGFF version.

    Parameters
    ----------
    version
        ``"0.5"`` or ``"0.4"`` (or :class:`srdvol.options.Ngff`).

    Raises
    ------
    ConfigError
        Naming ``ngff``, for any other version.
    """
    fmt = FORMATS.get(str(getattr(version, "value", version)))
    if fmt is None:
        choices = " or ".join(f"{flag('ngff')} {v}" for v in FORMATS)
        raise ConfigError(
            flag("ngff"), f"NGFF version {version!r} is not supported", f"use {choices}"
        )
    return fmt


def detect_format(attrs: Mapping[str, Any]) -> NgffFormat | None:
    """The format whose image metadata a group's attributes hold (``None``: no multiscales).

    A group with an ``ome`` mapping is read as 0.5, one with ``multiscales`` at the top as 0.4,
    whatever version it declares (:meth:`NgffFormat.read_multiscale` checks that).
    """
    for fmt in FORMATS.values():
        ome = fmt.ome_attributes(attrs)
        if ome is not None and ome.get("multiscales"):
            return fmt
    return None


def detect_labels_format(attrs: Mapping[str, Any]) -> NgffFormat | None:
    """The format whose ``labels`` metadata a group's attributes hold (``None``: no labels)."""
    for fmt in FORMATS.values():
        ome = fmt.ome_attributes(attrs)
        if ome is not None and "labels" in ome:
            return fmt
    return None


def _invalid(err: ValidationError, *, subject: str, version: str, what: str) -> InputError:
    """One sentence for metadata that ome-zarr-models refuses: where, and what is wrong."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["loc"] == ("datasets",) and first["type"] == "too_short":
        return InputError(
            subject,
            "the multiscales metadata lists no datasets, so the image has no array to read",
            "repair the image's metadata (each level needs a datasets entry with its path), or "
            f"point at the array itself and pass {flag('axes')}",
        )
    message = first["msg"].removeprefix("Value error, ")
    return InputError(
        subject,
        f"the {what} metadata is not valid NGFF {version} "
        f"({where + ': ' if where else ''}{message})",
        "repair the metadata (ome-zarr-models' validator lists every problem), or point at the "
        f"array inside the image and pass the axis order, for example {flag('axes')}=tzyx",
    )
