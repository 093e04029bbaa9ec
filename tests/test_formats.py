"""Tests for srdvol.ngff.formats: one object per NGFF version holds every difference."""

from __future__ import annotations

import json
from pathlib import Path

import numcodecs
import pytest
import zarr
from zarr.codecs import BloscCodec

from srdvol.errors import ConfigError, InputError
from srdvol.ngff.formats import (
    FORMATS,
    FormatV04,
    FormatV05,
    detect_format,
    detect_labels_format,
    format_for,
)
from srdvol.ngff.read import open_image
from srdvol.ngff.write import create_output
from srdvol.options import Ngff, OutputOptions

# version -> (Zarr format, type of the compressor, chunk key encoding, dimension names written)
VERSIONS = {
    "0.4": (2, numcodecs.Blosc, {"name": "v2", "separator": "/"}, False),
    "0.5": (3, BloscCodec, {"name": "default", "separator": "/"}, True),
}


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_each_version_knows_its_storage(version):
    zarr_format, compressor, encoding, named = VERSIONS[version]
    fmt = format_for(version)
    assert fmt.version == version
    assert fmt.zarr_format == zarr_format
    kwargs = fmt.array_kwargs(("t", "y", "x"))
    assert isinstance(kwargs["compressors"], compressor)
    assert kwargs["chunk_key_encoding"] == encoding
    assert ("dimension_names" in kwargs) is named
    if named:
        assert kwargs["dimension_names"] == ("t", "y", "x")
    # the layout alone (what label images use) leaves the compressor to zarr
    assert "compressors" not in fmt.layout_kwargs(("y", "x"))


def test_format_for_accepts_the_option_values_and_names_the_parameter():
    assert isinstance(format_for("0.4"), FormatV04)
    assert isinstance(format_for(Ngff.v05), FormatV05)
    assert list(FORMATS) == ["0.5", "0.4"]  # newest first: the default output
    with pytest.raises(ConfigError, match=r"^ngff: NGFF version '0.6' is not supported") as info:
        format_for("0.6")
    assert info.value.command_line_message().endswith("use --ngff 0.5 or --ngff 0.4.")


MULTISCALES = [{"axes": [], "datasets": []}]
DETECTED = [
    ({"ome": {"version": "0.5", "multiscales": MULTISCALES}}, "0.5", None),
    ({"multiscales": MULTISCALES, "omero": {}}, "0.4", None),
    ({"ome": {"version": "0.5", "labels": ["cells"]}}, None, "0.5"),
    ({"labels": ["cells"]}, None, "0.4"),
    ({"ome": {"version": "0.5", "multiscales": []}}, None, None),  # lists no image
    ({"srdvol": {"multiscales": MULTISCALES}}, None, None),  # NGFF keys elsewhere do not count
    ({}, None, None),
]


@pytest.mark.parametrize(("attrs", "image", "labels"), DETECTED)
def test_detect_where_the_metadata_lives(attrs, image, labels):
    found = detect_format(attrs)
    assert (found.version if found else None) == image
    found = detect_labels_format(attrs)
    assert (found.version if found else None) == labels


def test_written_metadata_sits_where_each_version_puts_it(tmp_path, make_image, ngff):
    path, _ = make_image(shape=(16, 8, 8))
    out = tmp_path / "out.zarr"
    create_output(out, like=open_image(path), options=OutputOptions(ngff=ngff), provenance={})
    if ngff == "0.5":
        document = json.loads((out / "zarr.json").read_text())
        attrs = document["attributes"]
        ome = attrs["ome"]
        assert ome["version"] == "0.5"
        assert "version" not in ome["multiscales"][0]
        assert not (out / ".zattrs").exists()
    else:
        attrs = json.loads((out / ".zattrs").read_text())
        assert "ome" not in attrs
        ome = attrs
        assert ome["multiscales"][0]["version"] == "0.4"
    assert set(ome) >= {"multiscales", "omero"}
    assert "srdvol" in attrs and "srdvol" not in (ome if ngff == "0.5" else {})
    multiscale = ome["multiscales"][0]
    assert multiscale["name"] == "denoised"
    assert [a["name"] for a in multiscale["axes"]] == ["t", "y", "x"]
    # optional fields that srdvol does not set are left out, not written as null
    assert "metadata" not in multiscale and "coordinateTransformations" not in multiscale
    assert all(value is not None for axis in multiscale["axes"] for value in axis.values())


def test_write_image_keeps_other_ngff_keys_and_validates_first(tmp_path):
    fmt = format_for("0.5")
    group = zarr.open_group(tmp_path / "image.zarr", mode="w", zarr_format=3)
    group.create_array("s0", shape=(16, 4, 4), dtype="uint8", **fmt.layout_kwargs("tyx"))
    axes = [("t", "time", "second"), ("y", "space", None), ("x", "space", None)]
    multiscale = fmt.new_multiscale(
        axes=axes, datasets=[("s0", [1.0, 1.0, 1.0], None)], name="image"
    )
    group.attrs["ome"] = {"version": "0.5", "omero": {"channels": []}, "note": "kept"}
    fmt.write_image(group, multiscale)
    ome = zarr.open_group(tmp_path / "image.zarr", mode="r").attrs["ome"]
    assert ome["note"] == "kept" and ome["omero"] == {"channels": []}
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}
    ]
    before = Path(tmp_path / "image.zarr" / "zarr.json").read_bytes()
    with pytest.raises(
        InputError, match=r"omero metadata is not valid NGFF 0.5 \(channels.0.window"
    ):
        fmt.write_image(group, multiscale, omero={"channels": [{"color": "FFFFFF"}]})
    assert Path(tmp_path / "image.zarr" / "zarr.json").read_bytes() == before
