"""Tests for srdvol.ngff.metadata: multiscales read through ome-zarr-models, for both versions.

Each case edits the metadata of an image written by ome-zarr-py, then opens it: forms NGFF
allows are read as srdvol always read them; metadata the models refuse is one InputError that
names the store and says how to go on, and the store is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr

from srdvol.errors import InputError
from srdvol.ngff.read import open_image


def _edit(path: str, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Apply ``change(ngff_keys, first_multiscale)`` to an image's metadata, in either version."""
    group = zarr.open_group(path, mode="r+")
    attrs = group.attrs.asdict()
    ome = attrs["ome"] if "ome" in attrs else attrs
    change(ome, ome["multiscales"][0])
    group.attrs.update(attrs)


def _transforms(ms: dict[str, Any], level: int = 0) -> list[dict[str, Any]]:
    return ms["datasets"][level]["coordinateTransformations"]


def _y_typed_as_time(ome, ms):
    ms["axes"][1]["type"] = "time"


def _translation_before_scale(ome, ms):
    ms["datasets"][0]["coordinateTransformations"].reverse()


def _scale_of_wrong_length(ome, ms):
    _transforms(ms)[0]["scale"] = [1.0, 1.0]


def _scale_in_a_file(ome, ms):
    ms["datasets"][0]["coordinateTransformations"] = [{"type": "scale", "path": "scale.bin"}]


def _no_axes(ome, ms):
    del ms["axes"]


def _declares_another_version(ome, ms):
    if "version" in ome:  # 0.5: once, beside multiscales
        ome["version"] = "0.6"
    else:  # 0.4: in each multiscale
        ms["version"] = "0.3"


REFUSED = [
    (_y_typed_as_time, r"multiscales metadata is not valid NGFF {v} \(axes: .*space axes \(1\)"),
    (_translation_before_scale, r"\(datasets.0.coordinateTransformations: Expected a scale or"),
    (_scale_of_wrong_length, r"not valid NGFF {v} \(.*transform.* dimensionality"),
    (_scale_in_a_file, r"a scale transform stored in a separate file \(scale.bin\)"),
    (_no_axes, r"not valid NGFF {v} \(axes: Field required\)"),
    (_declares_another_version, r"declares NGFF version 0.[36], which srdvol does not read"),
]


@pytest.mark.parametrize(("change", "pattern"), REFUSED, ids=[r[0].__name__ for r in REFUSED])
def test_metadata_the_models_refuse_is_one_clear_error(
    make_image, store_digest, ngff, change, pattern
):
    path, _ = make_image(ngff=ngff, translation={"x": 1.0})
    _edit(path, change)
    before = store_digest(path)
    with pytest.raises(InputError, match=pattern.format(v=ngff)) as caught:
        open_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and message.endswith(".")
    assert "axes=tzyx" in message or "inline" in message  # the way around it
    assert store_digest(path) == before


def test_multiscale_transform_applies_after_the_level_transform(make_image, ngff):
    path, _ = make_image(ngff=ngff, scale={"y": 0.5, "x": 0.5}, translation={"x": 2.0})

    def add_global(ome, ms):
        ms["coordinateTransformations"] = [
            {"type": "scale", "scale": [3.0, 2.0, 2.0]},
            {"type": "translation", "translation": [0.0, 10.0, 0.0]},
        ]

    _edit(path, add_global)
    image = open_image(path)
    # x -> global(level(x)): scale multiplies, the level's shift is scaled, then shifted
    assert image.attrs["scale"] == pytest.approx({"t": 3.0, "y": 1.0, "x": 1.0})
    assert image.attrs["translation"] == pytest.approx({"t": 0.0, "y": 10.0, "x": 4.0})


def test_axis_names_by_type_and_alias_and_missing_units(make_image, ngff):
    path, data = make_image(axes="tcyx", shape=(16, 2, 8, 8), ngff=ngff)

    def rename(ome, ms):
        ms["axes"][0] = {"name": "Time", "type": "time"}  # no unit
        ms["axes"][1] = {"name": "ch", "type": "channel"}

    _edit(path, rename)
    image = open_image(path)
    assert image.dims == ("t", "c", "y", "x")
    assert image.attrs["axes_units"] == {"t": None, "c": None, "y": "micrometer", "x": "micrometer"}
    np.testing.assert_array_equal(image.values, data)


def test_a_05_image_that_omits_its_version_is_read_as_05(make_image):
    path, _ = make_image(ngff="0.5")

    def drop_version(ome, ms):
        del ome["version"]

    _edit(path, drop_version)
    assert open_image(path).attrs["ngff_version"] == "0.5"
