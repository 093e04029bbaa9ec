"""Tests for srdvol.ngff.labels: label images written and read back in both NGFF versions."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import validate_ngff

from srdvol.errors import InputError
from srdvol.ngff.labels import read_masks, write_labels
from srdvol.ngff.read import open_image
from srdvol.ngff.write import create_output
from srdvol.options import OutputOptions


@pytest.fixture
def image_store(tmp_path, make_image, ngff):
    path, _ = make_image(axes="tzyx", shape=(16, 3, 12, 10))
    out = str(tmp_path / "image.zarr")
    create_output(out, like=open_image(path), options=OutputOptions(ngff=ngff), provenance={})
    return out


def test_labels_round_trip_and_validate(image_store, ngff):
    cells = np.random.default_rng(0).integers(0, 5, size=(3, 12, 10)).astype(np.int32)
    assert read_masks(image_store) is None  # none yet
    write_labels(image_store, cells, name="cells", axes="zyx", scale=[2.0, 0.5, 0.5])
    np.testing.assert_array_equal(read_masks(image_store), cells)
    model = validate_ngff(image_store)  # the image with its labels group
    assert model.labels is not None
    label = zarr.open_group(f"{image_store}/labels/cells", mode="r")
    attrs = label.attrs.asdict()
    ome = attrs["ome"] if ngff == "0.5" else attrs
    assert ome["image-label"] == {"version": ngff, "source": {"image": "../../"}}
    (dataset,) = ome["multiscales"][0]["datasets"]
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 0.5, 0.5]}]
    assert label["s0"].metadata.zarr_format == (3 if ngff == "0.5" else 2)


def test_more_labels_are_listed_and_the_first_is_read(image_store):
    first = np.ones((3, 12, 10), np.uint16)
    write_labels(image_store, first, name="cells", axes="zyx", scale=[1.0, 1.0, 1.0])
    write_labels(image_store, 2 * first, name="nuclei", axes="zyx", scale=[1.0, 1.0, 1.0])
    write_labels(image_store, 3 * first, name="cells", axes="zyx", scale=[1.0, 1.0, 1.0])
    labels = zarr.open_group(f"{image_store}/labels", mode="r").attrs.asdict()
    assert (labels.get("ome") or labels)["labels"] == ["cells", "nuclei"]
    np.testing.assert_array_equal(read_masks(image_store), 3 * first)  # replaced in place
    validate_ngff(image_store)


def test_labels_must_be_integers_of_an_image(tmp_path, image_store):
    with pytest.raises(InputError, match="labels of dtype float32 are not integer"):
        write_labels(
            image_store, np.zeros((3, 12, 10), np.float32), name="c", axes="zyx", scale=[1] * 3
        )
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(InputError, match="need an OME-Zarr image"):
        write_labels(
            plain.store_path.store.root,
            np.zeros((2, 2), np.int8),
            name="c",
            axes="yx",
            scale=[1, 1],
        )
    assert "labels" not in plain
