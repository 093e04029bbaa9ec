"""Tests for srdvol.ngff.read: OME-Zarr written by ome-zarr itself, plain arrays, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import fsspec
import numpy as np
import pytest
import zarr

from srdvol.errors import DataError, InputError, StoreNotFoundError, UnsupportedDtypeError
from srdvol.ngff.read import NamedReads, describe_image, open_image

LAYOUTS = [
    ("tyx", (16, 24, 20), (8, 16, 16)),
    ("tzyx", (17, 3, 20, 24), (4, 1, 16, 16)),
    ("tczyx", (16, 2, 2, 18, 20), (16, 1, 1, 8, 8)),
]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize(("axes", "shape", "chunks"), LAYOUTS)
def test_round_trip_data_axes_units_scale(make_image, ngff, axes, shape, chunks):
    scale = {"t": 0.25, "z": 2.0, "y": 0.4, "x": 0.3}
    translation = {"t": 5.0, "y": -3.0, "x": 7.5}
    path, data = make_image(
        axes=axes,
        shape=shape,
        ngff=ngff,
        chunks=chunks,
        scale={a: v for a, v in scale.items() if a in axes},
        translation=translation,
        dtype="int16",
    )
    image = open_image(path)
    assert image.dims == tuple(axes)
    assert isinstance(image.data, da.Array)
    assert image.data.chunks == da.core.normalize_chunks(chunks, shape)
    np.testing.assert_array_equal(image.values, data)
    assert image.dtype == np.int16
    assert image.attrs["ngff_version"] == ngff
    assert image.attrs["levels"] == 1
    assert image.attrs["store_chunks"] == dict(zip(axes, chunks, strict=True))
    for axis in axes:
        if axis == "c":
            np.testing.assert_array_equal(image.coords["c"], np.arange(shape[axes.index("c")]))
            continue
        assert image.attrs["scale"][axis] == pytest.approx(scale[axis])
        shift = translation.get(axis, 0.0)
        assert image.attrs["translation"][axis] == pytest.approx(shift)
        expected = scale[axis] * np.arange(image.sizes[axis]) + shift
        np.testing.assert_allclose(image.coords[axis].values, expected)
    assert image.attrs["axes_units"]["t"] == "second"
    assert image.attrs["axes_units"]["y"] == "micrometer"


def test_array_is_opened_read_only(make_image, store_digest):
    path, _ = make_image()
    before = store_digest(path)
    image = open_image(path)
    # the zarr array inside the dask graph (behind the reader that names failing chunks)
    # must refuse writes
    arrays = [v.array for v in image.data.dask.values() if isinstance(v, NamedReads)]
    assert arrays, "the dask graph should hold the zarr array"
    assert all(a.read_only for a in arrays)
    with pytest.raises(Exception, match=r"(?i)read.?only"):
        arrays[0][0, 0, 0] = 1
    image.sum().compute()
    assert store_digest(path) == before


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_level_and_channel(make_image, ngff):
    path, data = make_image(
        axes="tcyx", shape=(16, 3, 32, 32), ngff=ngff, levels=2, scale={"y": 0.5, "x": 0.5}
    )
    image = open_image(path, level=1, channel=2)
    assert image.attrs["levels"] == 2
    assert image.shape == (16, 1, 16, 16)
    assert image.attrs["channel"] == 2
    assert image.coords["c"].values.tolist() == [2]
    assert image.attrs["scale"]["y"] == pytest.approx(1.0)
    full = open_image(path, channel=1)
    np.testing.assert_array_equal(full.values, data[:, 1:2])


def test_file_url_and_memory_filesystem(make_image):
    path, data = make_image(axes="tzyx", shape=(16, 2, 16, 16))
    image = open_image(Path(path).as_uri())
    np.testing.assert_array_equal(image.values, data)
    # memory:// (an fsspec filesystem zarr reaches through FsspecStore)
    url = "memory://srdvol-test-io/image.zarr"
    try:
        group = zarr.open_group(url, mode="w")
        group.create_array("raw", data=data[:, 0])
        mem = open_image(f"{url}/raw", axes="tyx")
        np.testing.assert_array_equal(mem.values, data[:, 0])
        assert describe_image(f"{url}/raw", axes="tyx")["bytes_on_disk"] > 0
    finally:
        fsspec.filesystem("memory").rm("/srdvol-test-io", recursive=True)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_array_with_axes(make_plain_array, zarr_format):
    path, data = make_plain_array(
        shape=(16, 2, 8, 12), zarr_format=zarr_format, chunks=(4, 1, 8, 6)
    )
    image = open_image(path, axes="tzyx")
    assert image.dims == ("t", "z", "y", "x")
    assert image.attrs["ngff_version"] is None
    assert image.attrs["scale"] == {"t": 1.0, "z": 1.0, "y": 1.0, "x": 1.0}
    assert image.data.chunks[0] == (4, 4, 4, 4)
    np.testing.assert_array_equal(image.values, data)


def test_axes_override_metadata(make_image):
    path, data = make_image(axes="tyx", shape=(16, 8, 8))
    image = open_image(path, axes="tyx")
    np.testing.assert_array_equal(image.values, data)
    with pytest.raises(InputError, match=r"names 4 axes but the array has 3"):
        open_image(path, axes="tzyx")


def test_describe_image(make_image):
    path, _ = make_image(axes="tzyx", shape=(20, 3, 16, 24), chunks=(5, 1, 16, 8), dtype="uint16")
    info = describe_image(path)
    assert info["axes"] == "tzyx"
    assert info["shape"] == {"t": 20, "z": 3, "y": 16, "x": 24}
    assert info["chunks"] == {"t": 5, "z": 1, "y": 16, "x": 8}
    assert info["dtype"] == "uint16"
    assert info["movies"] == 3
    assert info["nbytes"] == 20 * 3 * 16 * 24 * 2
    on_disk = sum(f.stat().st_size for f in (Path(path) / "s0").rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["ngff_version"] == "0.5"
    assert info["levels"] == 1
    assert info["problems"] == []


def test_describe_lists_content_problems(make_image):
    path, _ = make_image(shape=(8, 16, 16))
    info = describe_image(path)
    assert len(info["problems"]) == 1
    assert "8 frames" in info["problems"][0]


# ---- bad inputs: one row each; right class, message names the path and the fix, input unchanged


def _not_a_store(tmp_path, make_image, make_plain_array):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not zarr")
    return str(folder), {}


def _missing(tmp_path, make_image, make_plain_array):
    return str(tmp_path / "absent.zarr"), {}


def _no_time_axis(tmp_path, make_image, make_plain_array):
    path, _ = make_plain_array(shape=(4, 16, 16))
    return path, {"axes": "zyx"}


def _no_time_in_metadata(tmp_path, make_image, make_plain_array):
    group = zarr.open_group(str(tmp_path / "zyx.zarr"), mode="w")
    group.create_array("s0", shape=(4, 8, 8), dtype="uint16")
    axes = [{"name": n, "type": "space"} for n in "zyx"]
    datasets = [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 3}]}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return str(tmp_path / "zyx.zarr"), {}


def _few_frames(tmp_path, make_image, make_plain_array):
    return make_image(shape=(15, 16, 16))[0], {}


def _complex(tmp_path, make_image, make_plain_array):
    return make_plain_array(shape=(16, 8, 8), dtype="complex64")[0], {"axes": "tyx"}


def _bool(tmp_path, make_image, make_plain_array):
    return make_plain_array(shape=(16, 8, 8), dtype="bool")[0], {"axes": "tyx"}


def _plain_without_axes(tmp_path, make_image, make_plain_array):
    return make_plain_array()[0], {}


def _group_without_multiscales(tmp_path, make_image, make_plain_array):
    group = zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    group.create_array("raw", shape=(16, 8, 8), dtype="uint16")
    return str(tmp_path / "bare.zarr"), {}


def _level_out_of_range(tmp_path, make_image, make_plain_array):
    return make_image()[0], {"level": 3}


def _channel_out_of_range(tmp_path, make_image, make_plain_array):
    return make_image(axes="tcyx", shape=(16, 2, 8, 8))[0], {"channel": 2}


def _level_metadata(path: str) -> Path:
    """The metadata file of level 0 of an image written by make_image."""
    level = open_image(path).attrs["array_path"]
    folder = Path(path) / level
    return folder / "zarr.json" if (folder / "zarr.json").exists() else folder / ".zarray"


def _malformed_array_json(tmp_path, make_image, make_plain_array):
    path = make_image()[0]
    meta = _level_metadata(path)
    meta.write_text(meta.read_text().replace('"shape"', "shape"))
    return path, {}


def _array_json_without_shape(tmp_path, make_image, make_plain_array):
    path = make_image()[0]
    meta = _level_metadata(path)
    document = json.loads(meta.read_text())
    del document["shape"]
    meta.write_text(json.dumps(document))
    return path, {}


def _malformed_v2_zarray(tmp_path, make_image, make_plain_array):
    path = make_image(ngff="0.4")[0]
    meta = _level_metadata(path)
    meta.write_text(meta.read_text()[:-20])
    return path, {}


def _malformed_group_json(tmp_path, make_image, make_plain_array):
    path = make_image()[0]
    meta = Path(path) / "zarr.json"
    meta.write_text(meta.read_text().replace('"attributes"', "attributes"))
    return path, {}


def _no_datasets(tmp_path, make_image, make_plain_array):
    path = make_image()[0]
    group = zarr.open_group(path, mode="r+")
    ome = dict(group.attrs["ome"])
    ome["multiscales"] = [{**ome["multiscales"][0], "datasets": []}]
    group.attrs["ome"] = ome
    return path, {}


BAD = [
    (_not_a_store, StoreNotFoundError, r"not a Zarr store.*point srdvol at an OME-Zarr image"),
    (_missing, StoreNotFoundError, r"no such file or directory; check the path"),
    (_no_time_axis, InputError, r"no time axis.*pass axes"),
    (_no_time_in_metadata, InputError, r"no time axis.*pass axes"),
    (_few_frames, DataError, r"15 frames, fewer than the 16.*at least 16 frames"),
    (_complex, UnsupportedDtypeError, r"complex dtype complex64.*convert it"),
    (_bool, UnsupportedDtypeError, r"bool dtype bool.*convert it"),
    (_plain_without_axes, InputError, r"plain Zarr array.*pass the axis order, for example axes="),
    (_group_without_multiscales, InputError, r"no OME-Zarr multiscales.*raw with axes=tzyx"),
    (_level_out_of_range, InputError, r"level 3 does not exist.*pass level between 0 and 0"),
    (_channel_out_of_range, InputError, r"channel 2 does not exist.*pass channel between 0 and 1"),
    (_malformed_array_json, InputError, r"/zarr.json: the array metadata cannot be read \(JSON"),
    (_array_json_without_shape, InputError, r"/zarr.json: .* cannot be read \(KeyError: 'shape'"),
    (_malformed_v2_zarray, InputError, r"/.zarray: the array metadata cannot be read"),
    (_malformed_group_json, InputError, r"/zarr.json: the Zarr metadata cannot be read \(JSON"),
    (_no_datasets, InputError, r"lists no datasets.*repair the image's metadata"),
]


@pytest.mark.parametrize(("build", "error", "pattern"), BAD, ids=[b[0].__name__ for b in BAD])
def test_bad_input(tmp_path, make_image, make_plain_array, store_digest, build, error, pattern):
    path, kwargs = build(tmp_path, make_image, make_plain_array)
    existed = os.path.exists(path)
    before = store_digest(path) if existed else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=pattern) as caught:
        open_image(path, **kwargs)
    message = str(caught.value)
    assert message.startswith((f"{path}: ", f"{path}/")), message  # the store or a file in it
    assert message.endswith("."), message
    assert os.path.exists(path) == existed  # reading created nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    if existed:
        assert store_digest(path) == before


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_a_damaged_chunk_is_named_wherever_it_is_read(make_image, ngff):
    import pickle

    path, _ = make_image(shape=(32, 8, 8), chunks=(16, 8, 8), ngff=ngff)
    image = open_image(path)
    array = zarr.open_array(f"{path}/{image.attrs['array_path']}", mode="r")
    key = array.metadata.encode_chunk_key((1, 0, 0))
    chunk = Path(path) / image.attrs["array_path"] / key
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    subject = f"{path}/{image.attrs['array_path']}/{key}"
    pattern = rf"^{subject}: the chunk at t=16:32, y=0:8, x=0:8 cannot be read or decoded"
    with pytest.raises(DataError, match=pattern) as caught:
        image.isel(t=slice(10, 20)).compute()  # dask reads chunk by chunk
    assert "restore this chunk from a good copy" in str(caught.value)
    (reads,) = [v for v in image.data.dask.values() if isinstance(v, NamedReads)]
    with pytest.raises(DataError, match=pattern):
        reads[10:20, :, :]  # one read spanning the good and the bad chunk finds the bad one
    again = pickle.loads(pickle.dumps(caught.value))  # as it travels back from a Dask worker
    assert type(again) is DataError and str(again) == str(caught.value)
    np.testing.assert_array_equal(image.isel(t=slice(0, 16)).values, array[0:16])
