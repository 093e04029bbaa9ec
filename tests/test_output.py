"""Tests for srdvol.ngff.write: creation, NGFF validity, resume/refusal, parallel writes, pyramid."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from srdvol.errors import ConfigError, OutputExistsError, OutputPathError
from srdvol.ngff.read import open_image
from srdvol.ngff.write import (
    check_output_path,
    create_output,
    make_run_id,
    open_output_array,
    output_chunks,
    pyramid_shapes,
    read_provenance,
    write_pyramid,
)

PROVENANCE = {"parameters": {"patch": [16, 32, 32], "overlap": 0.25}, "model_sha256": "abc"}


def _validate(path: str, ngff: str) -> None:
    """Validate with ome-zarr-models and read back with ome-zarr's Reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader
        from ome_zarr_models import v04, v05

    group = zarr.open_group(path, mode="r")
    model = (v05 if ngff == "0.5" else v04).Image.from_zarr(group)
    assert model is not None
    location = parse_url(path, mode="r")
    assert location is not None
    nodes = list(Reader(location)())
    assert nodes and nodes[0].data, "ome-zarr's Reader found no image"
    level0 = nodes[0].data[0]
    assert tuple(level0.shape) == tuple(group["s0"].shape)


def _reference_halve(a: np.ndarray, y: int, x: int) -> np.ndarray:
    """Independent 2x2 mean: loop over output pixels, averaging the pixels that exist."""
    out_shape = list(a.shape)
    out_shape[y] = math.ceil(a.shape[y] / 2)
    out_shape[x] = math.ceil(a.shape[x] / 2)
    out = np.zeros(out_shape, dtype=np.float64)
    moved = np.moveaxis(a.astype(np.float64), (y, x), (-2, -1))
    res = np.moveaxis(out, (y, x), (-2, -1))
    for i in range(res.shape[-2]):
        for j in range(res.shape[-1]):
            res[..., i, j] = moved[..., 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(axis=(-2, -1))
    return out


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize(
    ("axes", "shape"),
    [("tyx", (16, 20, 24)), ("tzyx", (16, 2, 12, 10)), ("tczyx", (16, 2, 2, 8, 8))],
)
def test_round_trip_metadata_and_data(tmp_path, make_image, ngff, axes, shape):
    scale = {"t": 0.5, "z": 2.0, "y": 0.4, "x": 0.4}
    path, data = make_image(
        axes=axes,
        shape=shape,
        ngff=ngff,
        scale={a: v for a, v in scale.items() if a in axes},
        translation={"y": 3.0, "x": -1.0},
    )
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    array = create_output(out, like=image, dtype="float32", ngff=ngff, provenance=PROVENANCE)
    assert array.dtype == np.float32
    assert array.shape == shape
    array[...] = data.astype(np.float32) * 2
    _validate(out, ngff)
    back = open_image(out)
    assert back.dims == image.dims
    assert back.attrs["ngff_version"] == ngff
    assert back.attrs["scale"] == pytest.approx(image.attrs["scale"])
    assert back.attrs["translation"] == pytest.approx(image.attrs["translation"])
    assert back.attrs["axes_units"] == image.attrs["axes_units"]
    np.testing.assert_array_equal(back.values, data.astype(np.float32) * 2)
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == (3 if ngff == "0.5" else 2)
    record = read_provenance(out)
    assert record is not None
    assert record["input"] == path
    assert record["parameters"] == PROVENANCE["parameters"]
    assert record["version"]
    assert record["run_id"] == make_run_id(record)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_codec_chunks_and_omero(tmp_path, make_image, ngff):
    path, data = make_image(axes="tzyx", shape=(16, 2, 40, 40), dtype="uint16")
    out = str(tmp_path / "out.zarr")
    array = create_output(
        out, like=open_image(path), dtype="uint16", chunks={"y": 32}, ngff=ngff, provenance={}
    )
    assert array.chunks == (16, 1, 32, 40)
    if ngff == "0.5":
        (codec,) = array.compressors
        assert (codec.cname.value, codec.clevel) == ("zstd", 3)
        assert array.metadata.dimension_names == ("t", "z", "y", "x")
    else:
        (codec,) = array.compressors
        assert (codec.cname, codec.clevel) == ("zstd", 3)
        zarray = json.loads((Path(out) / "s0" / ".zarray").read_text())
        assert zarray["dimension_separator"] == "/"
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    omero = (attrs["ome"] if ngff == "0.5" else attrs)["omero"]
    window = omero["channels"][0]["window"]
    # one storage chunk in the middle of the recording: here the whole first plane
    sample = data[:, 0].astype(np.float64)
    assert window["start"] == pytest.approx(np.percentile(sample, 0.1))
    assert window["end"] == pytest.approx(np.percentile(sample, 99.9))
    assert (window["min"], window["max"]) == (0, 65535)


def test_output_chunks_defaults():
    # 512x512 float32 frames are 1 MiB: 4 frames make the 4 MiB target
    assert output_chunks({"t": 1000, "z": 10, "y": 512, "x": 512}) == {
        "t": 4,
        "z": 1,
        "y": 512,
        "x": 512,
    }
    assert output_chunks({"t": 1000, "c": 2, "y": 2048, "x": 2048}, dtype="uint16") == {
        "t": 8,
        "c": 1,
        "y": 512,
        "x": 512,
    }
    assert output_chunks({"t": 10, "y": 64, "x": 64}) == {"t": 10, "y": 64, "x": 64}
    assert output_chunks({"t": 100, "y": 64, "x": 64}, chunks={"t": 1}) == {
        "t": 1,
        "y": 64,
        "x": 64,
    }
    with pytest.raises(ConfigError, match="--chunks"):
        output_chunks({"t": 10, "y": 8, "x": 8}, chunks={"z": 1})
    with pytest.raises(ConfigError, match="not positive"):
        output_chunks({"t": 10, "y": 8, "x": 8}, chunks={"t": 0})


def test_resume_same_run_and_overwrite(tmp_path, make_image):
    path, data = make_image(shape=(16, 8, 8))
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    first = create_output(out, like=image, provenance=PROVENANCE)
    first[:8] = 7.0
    run_id = read_provenance(out)["run_id"]
    again = create_output(out, like=image, provenance=PROVENANCE)
    assert read_provenance(out)["run_id"] == run_id
    np.testing.assert_array_equal(again[:8], 7.0)  # resumed: work kept
    replaced = create_output(out, like=image, provenance=PROVENANCE, overwrite=True)
    np.testing.assert_array_equal(replaced[...], 0.0)
    other = create_output(out, like=image, provenance={"other": 1}, overwrite=True)
    assert read_provenance(out)["run_id"] != run_id
    assert other.shape == data.shape


def test_explicit_run_id_is_kept(tmp_path, make_image):
    path, _ = make_image(shape=(16, 8, 8))
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={"run_id": "my-run"})
    assert read_provenance(out)["run_id"] == "my-run"
    assert open_output_array(out).read_only is False


@pytest.mark.slow
def test_parallel_writes_from_worker_processes_lose_nothing(tmp_path, make_image):
    from distributed import Client, LocalCluster

    path, data = make_image(axes="tzyx", shape=(32, 2, 48, 40), chunks=(8, 1, 16, 16))
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    array = create_output(
        out, like=image, chunks={"t": 8, "y": 16, "x": 16}, ngff="0.5", provenance={}
    )
    chunks = array.chunks
    starts = [
        (t, z, y, x)
        for t in range(0, 32, chunks[0])
        for z in range(0, 2, chunks[1])
        for y in range(0, 48, chunks[2])
        for x in range(0, 40, chunks[3])
    ]

    def write_chunk(start, output, source):
        import numpy as np
        import zarr as zarr_

        from srdvol.ngff.write import open_output_array as open_out

        target = open_out(output)
        region = tuple(
            slice(s, min(s + c, n))
            for s, c, n in zip(start, target.chunks, target.shape, strict=True)
        )
        block = zarr_.open_group(source, mode="r")["s0"][region]
        target[region] = np.asarray(block, dtype=np.float32) + 0.5
        return os.getpid()

    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = client.map(write_chunk, starts, output=out, source=path, pure=False)
        pids = set(client.gather(futures))
        levels = write_pyramid(out, client=client, min_size=16)
    assert len(pids) == 2, "both worker processes should have written chunks"
    np.testing.assert_array_equal(open_output_array(out)[...], data.astype(np.float32) + 0.5)
    assert levels == ["s0", "s1", "s2"]
    level1 = open_output_array(out, level=1)[...]
    np.testing.assert_allclose(level1, _reference_halve(data + 0.5, 2, 3), rtol=1e-6)
    _validate(out, "0.5")


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_pyramid_levels_match_numpy_reference(tmp_path, make_image, ngff, dtype):
    path, data = make_image(axes="tzyx", shape=(16, 2, 37, 21), dtype="uint16")
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    array = create_output(
        out, like=image, dtype=dtype, chunks={"y": 8, "x": 8}, ngff=ngff, provenance={}
    )
    array[...] = data
    levels = write_pyramid(out, min_size=6)
    shapes = pyramid_shapes(data.shape, ("t", "z", "y", "x"), min_size=6)
    assert [s[2:] for s in shapes] == [(19, 11), (10, 6), (5, 3)]
    assert levels == ["s0", "s1", "s2", "s3"]
    expected = data.astype(np.float64)
    for k in range(1, 4):
        expected = _reference_halve(expected, 2, 3)
        got = open_output_array(out, level=k)[...]
        assert got.dtype == np.dtype(dtype)
        assert got.shape == shapes[k - 1]
        if dtype == "uint16":
            # each level is rounded before the next is computed from it
            expected = np.rint(expected)
            np.testing.assert_array_equal(got, expected.astype(np.uint16))
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5)
    _validate(out, ngff)
    level2 = open_image(out, level=2)
    assert level2.attrs["scale"]["y"] == pytest.approx(4 * image.attrs["scale"]["y"])
    # pixel centres stay in place: level-2 pixel 0 covers level-0 pixels 0..3
    assert level2.attrs["translation"]["x"] == pytest.approx(1.5 * image.attrs["scale"]["x"])
    # a second call rebuilds the same levels, and fewer levels drop the stale ones
    assert write_pyramid(out, min_size=20) == ["s0", "s1"]
    assert sorted(zarr.open_group(out, mode="r").array_keys()) == ["s0", "s1"]
    _validate(out, ngff)


def test_check_output_path_accepts_siblings_and_urls(tmp_path):
    check_output_path(tmp_path / "out.zarr", tmp_path / "in.zarr")
    check_output_path(tmp_path / "in.zarr.out", tmp_path / "in.zarr")
    with pytest.raises(OutputPathError, match="inside the input"):
        check_output_path((tmp_path / "in.zarr" / "x").as_uri(), tmp_path / "in.zarr")


# ---- refusals: right class, message names the output and the fix, nothing written, input kept


def _inside(tmp_path, path):
    return os.path.join(path, "denoised.zarr"), {}


def _same(tmp_path, path):
    return path, {}


def _contains_input_with_overwrite(tmp_path, path):
    return str(tmp_path), {"overwrite": True}


def _other_run(tmp_path, path):
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={"run": "earlier"})
    return out, {}


def _not_zarr(tmp_path, path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("someone's data")
    return str(out), {}


def _not_zarr_with_overwrite(tmp_path, path):
    out, _ = _not_zarr(tmp_path, path)
    return out, {"overwrite": True}


def _not_srdvol(tmp_path, path):
    out = tmp_path / "other.zarr"
    zarr.open_group(out, mode="w").attrs["tool"] = "someone else's"
    return str(out), {}


def _is_the_model(tmp_path, path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    return str(model), {"overwrite": True, "keep": [str(model)]}


def _holds_the_model(tmp_path, path):
    folder = tmp_path / "models.zarr"
    zarr.open_group(folder, mode="w")  # even a Zarr store: it holds the model
    (folder / "m.safetensors").write_bytes(b"weights")
    return str(folder), {"overwrite": True, "keep": [str(folder / "m.safetensors")]}


def _bad_ngff(tmp_path, path):
    return str(tmp_path / "out.zarr"), {"ngff": "0.6"}


def _bad_dtype(tmp_path, path):
    return str(tmp_path / "out.zarr"), {"dtype": "complex64"}


REFUSALS = [
    (_inside, OutputPathError, r"inside the input image.*choose an output path outside"),
    (_same, OutputPathError, r"the output is the input image.*choose an output path outside"),
    (_contains_input_with_overwrite, OutputPathError, r"contains the input image"),
    (_other_run, OutputExistsError, r"another srdvol run.*pass --overwrite"),
    (_not_zarr, OutputPathError, r"not a Zarr store.*never deletes it"),
    (_not_zarr_with_overwrite, OutputPathError, r"not a Zarr store.*not even with --overwrite"),
    (_not_srdvol, OutputExistsError, r"not a srdvol output.*pass --overwrite"),
    (_is_the_model, OutputPathError, r"the output is the model file"),
    (_holds_the_model, OutputPathError, r"a folder that holds the model file"),
    (_bad_ngff, ConfigError, r"--ngff.*use --ngff 0.5"),
    (_bad_dtype, ConfigError, r"--dtype.*use --dtype float32"),
]


@pytest.mark.parametrize(
    ("build", "error", "pattern"), REFUSALS, ids=[r[0].__name__ for r in REFUSALS]
)
def test_refusals(tmp_path, make_image, store_digest, build, error, pattern):
    path, _ = make_image(shape=(16, 8, 8))
    image = open_image(path)
    out, kwargs = build(tmp_path, path)
    input_before = store_digest(path)
    existed = os.path.exists(out)
    out_before = store_digest(out) if existed else None
    with pytest.raises(error, match=pattern) as caught:
        create_output(out, like=image, provenance={"run": "now"}, **kwargs)
    message = str(caught.value)
    subject = "--ngff" if kwargs.get("ngff") else "--dtype" if kwargs.get("dtype") else out
    assert message.startswith(f"{subject}: "), message
    assert store_digest(path) == input_before
    assert os.path.exists(out) == existed
    if existed:
        assert store_digest(out) == out_before
