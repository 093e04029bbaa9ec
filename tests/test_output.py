"""Tests for srdvol.ngff.write: creation, NGFF validity, resume/refusal, parallel writes.

The writer's tests run for each NGFF version and for an input held in numpy or dask (the
``ngff`` and ``backend`` fixtures); every store written is validated with ome-zarr-models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import held_as, validate_ngff

from srdvol.errors import ConfigError, InputError, OutputExistsError, OutputPathError
from srdvol.ngff.paths import check_output_path
from srdvol.ngff.provenance import make_run_id, read_provenance
from srdvol.ngff.read import open_image
from srdvol.ngff.write import (
    check_output,
    create_output,
    open_output_array,
    output_chunks,
)
from srdvol.options import OutputOptions

PROVENANCE = {"parameters": {"patch": [16, 32, 32], "overlap": 0.25}, "model_sha256": "abc"}


@pytest.mark.parametrize(
    ("axes", "shape"),
    [("tyx", (16, 20, 24)), ("tzyx", (16, 2, 12, 10)), ("tczyx", (16, 2, 2, 8, 8))],
)
def test_round_trip_metadata_and_data(tmp_path, make_image, ngff, backend, axes, shape):
    scale = {"t": 0.5, "z": 2.0, "y": 0.4, "x": 0.4}
    path, data = make_image(
        axes=axes,
        shape=shape,
        ngff=ngff,
        scale={a: v for a, v in scale.items() if a in axes},
        translation={"y": 3.0, "x": -1.0},
    )
    image = held_as(open_image(path), backend)
    out = str(tmp_path / "out.zarr")
    options = OutputOptions(dtype="float32", ngff=ngff)
    array = create_output(out, like=image, options=options, provenance=PROVENANCE)
    assert array.dtype == np.float32
    assert array.shape == shape
    doubled = image.data.astype(np.float32) * 2
    if backend == "dask":
        da.store(doubled, array, lock=False)
    else:
        array[...] = doubled
    validate_ngff(out)
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
    assert record["ngff"] == ngff
    assert record["parameters"] == PROVENANCE["parameters"]
    assert record["version"]
    assert record["run_id"] == make_run_id(record)


def test_codec_chunks_and_omero(tmp_path, make_image, ngff, backend):
    path, data = make_image(axes="tzyx", shape=(16, 2, 40, 40), dtype="uint16")
    out = str(tmp_path / "out.zarr")
    array = create_output(
        out,
        like=held_as(open_image(path), backend),
        options=OutputOptions(dtype="input", ngff=ngff),
        chunks={"y": 32},
        provenance={},
    )
    assert array.chunks == (16, 1, 32, 40)
    assert array.dtype == np.uint16
    (codec,) = array.compressors
    if ngff == "0.5":
        assert (codec.cname.value, codec.clevel, codec.shuffle.value) == ("zstd", 3, "bitshuffle")
        assert array.metadata.dimension_names == ("t", "z", "y", "x")
    else:
        assert (codec.cname, codec.clevel, codec.shuffle) == ("zstd", 3, 2)
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
    assert [c["label"] for c in omero["channels"]] == ["denoised channel 0"]
    assert omero["rdefs"] == {"model": "greyscale", "defaultT": 8, "defaultZ": 1}
    validate_ngff(out)


@pytest.mark.parametrize("compression", [0, 9])
def test_chosen_chunks_and_compression_reach_every_level(tmp_path, make_image, ngff, compression):
    from srdvol.ngff.pyramid import write_pyramid

    path, data = make_image(axes="tyx", shape=(16, 160, 160), dtype="uint16")
    out = str(tmp_path / "out.zarr")
    options = OutputOptions(dtype="input", ngff=ngff, chunks=(8, 64, 32), compression=compression)
    array = create_output(out, like=open_image(path), options=options, provenance={})
    assert array.chunks == (8, 64, 32)
    array[...] = data
    assert write_pyramid(out) == ["s0", "s1", "s2"]
    for level in ("s0", "s1", "s2"):
        codecs = zarr.open_array(f"{out}/{level}", mode="r").compressors
        if compression:
            assert [c.clevel for c in codecs] == [9], level
        else:
            assert codecs == (), level  # stored uncompressed
    validate_ngff(out)


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
    with pytest.raises(ConfigError, match=r"^chunks: names axes"):
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
    overwrite = OutputOptions(overwrite=True)
    replaced = create_output(out, like=image, options=overwrite, provenance=PROVENANCE)
    np.testing.assert_array_equal(replaced[...], 0.0)
    other = create_output(out, like=image, options=overwrite, provenance={"other": 1})
    assert read_provenance(out)["run_id"] != run_id
    assert other.shape == data.shape


def test_explicit_run_id_is_kept(tmp_path, make_image):
    path, _ = make_image(shape=(16, 8, 8))
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={"run_id": "my-run"})
    assert read_provenance(out)["run_id"] == "my-run"
    assert open_output_array(out).read_only is False


def test_open_output_array_names_what_is_wrong(tmp_path, make_image):
    path, _ = make_image(shape=(16, 8, 8))
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={})
    with pytest.raises(InputError, match=r"level 1 does not exist.*pass level between 0 and 0"):
        open_output_array(out, level=1)
    zarr.open_group(tmp_path / "bare.zarr", mode="w")
    with pytest.raises(InputError, match=r"^.*bare.zarr: this is not an OME-Zarr image created"):
        open_output_array(tmp_path / "bare.zarr")
    with pytest.raises(InputError, match="not an OME-Zarr image created by srdvol"):
        open_output_array(tmp_path / "absent.zarr")


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
    return str(tmp_path), {"options": OutputOptions(overwrite=True)}


def _other_run(tmp_path, path):
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={"run": "earlier"})
    return out, {}


def _same_run_other_dtype(tmp_path, path):
    out = str(tmp_path / "out.zarr")
    create_output(out, like=open_image(path), provenance={"run_id": "fixed"})
    return out, {"options": OutputOptions(dtype="input"), "provenance": {"run_id": "fixed"}}


def _not_zarr(tmp_path, path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("someone's data")
    return str(out), {}


def _not_zarr_with_overwrite(tmp_path, path):
    out, _ = _not_zarr(tmp_path, path)
    return out, {"options": OutputOptions(overwrite=True)}


def _not_srdvol(tmp_path, path):
    out = tmp_path / "other.zarr"
    zarr.open_group(out, mode="w").attrs["tool"] = "someone else's"
    return str(out), {}


def _is_the_model(tmp_path, path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    return str(model), {"options": OutputOptions(overwrite=True), "keep": [str(model)]}


def _holds_the_model(tmp_path, path):
    folder = tmp_path / "models.zarr"
    zarr.open_group(folder, mode="w")  # even a Zarr store: it holds the model
    (folder / "m.safetensors").write_bytes(b"weights")
    keep = [str(folder / "m.safetensors")]
    return str(folder), {"options": OutputOptions(overwrite=True), "keep": keep}


def _complex_input_dtype(tmp_path, path):
    image = open_image(path)
    like = image.copy(data=image.data.astype("complex64"))
    return str(tmp_path / "out.zarr"), {"like": like, "options": OutputOptions(dtype="input")}


def _unknown_chunk_axis(tmp_path, path):
    return str(tmp_path / "out.zarr"), {"chunks": {"z": 1}}


REFUSALS = [
    (_inside, OutputPathError, r"inside the input image.*choose an output path outside"),
    (_same, OutputPathError, r"the output is the input image.*choose an output path outside"),
    (_contains_input_with_overwrite, OutputPathError, r"contains the input image"),
    (_other_run, OutputExistsError, r"another srdvol run.*pass overwrite to replace it"),
    (
        _same_run_other_dtype,
        OutputExistsError,
        r"dtype float32, not \(16, 8, 8\) and uint16; pass overwrite",
    ),
    (_not_zarr, OutputPathError, r"not a Zarr store.*never deletes it"),
    (_not_zarr_with_overwrite, OutputPathError, r"not a Zarr store.*not even with overwrite"),
    (_not_srdvol, OutputExistsError, r"not a srdvol output.*pass overwrite"),
    (_is_the_model, OutputPathError, r"the output is the model file"),
    (_holds_the_model, OutputPathError, r"a folder that holds the model file"),
    (_complex_input_dtype, ConfigError, r"^dtype: output dtype complex64.*use dtype float32"),
    (_unknown_chunk_axis, ConfigError, r"^chunks: names axes \['z'\]"),
]


@pytest.mark.parametrize(
    ("build", "error", "pattern"), REFUSALS, ids=[r[0].__name__ for r in REFUSALS]
)
def test_refusals(tmp_path, make_image, store_digest, build, error, pattern):
    path, _ = make_image(shape=(16, 8, 8))
    out, kwargs = build(tmp_path, path)
    kwargs.setdefault("like", open_image(path))
    kwargs.setdefault("provenance", {"run": "now"})
    input_before = store_digest(path)
    existed = os.path.exists(out)
    out_before = store_digest(out) if existed else None
    with pytest.raises(error, match=pattern):
        check_output(out, **kwargs)  # the same checks, written first
    with pytest.raises(error, match=pattern) as caught:
        create_output(out, **kwargs)
    message = str(caught.value)
    subject = out if error is not ConfigError else message.split(":")[0]
    assert message.startswith(f"{subject}: "), message
    if error is ConfigError:  # the command line shows the parameter as its flag
        assert caught.value.command_line_message().startswith(f"--{subject}: ")
    assert store_digest(path) == input_before
    assert os.path.exists(out) == existed
    if existed:
        assert store_digest(out) == out_before


def test_check_output_says_what_create_output_will_do(tmp_path, make_image, store_digest):
    path, _ = make_image(shape=(16, 8, 8))
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    assert check_output(out, like=image, provenance=PROVENANCE) == "create"
    assert not os.path.exists(out)
    create_output(out, like=image, provenance=PROVENANCE)
    before = store_digest(out)
    assert check_output(out, like=image, provenance=PROVENANCE) == "resume"
    overwrite = OutputOptions(overwrite=True)
    assert check_output(out, like=image, options=overwrite, provenance={"other": 1}) == "replace"
    assert store_digest(out) == before


def test_omero_hints_of_float_data_and_a_chosen_channel(backend):
    from srdvol.ngff.omero import omero_hints

    values = np.linspace(-5.0, 5.0, 16 * 2 * 10 * 10).reshape(16, 2, 10, 10).astype(np.float32)
    data = values if backend == "numpy" else da.from_array(values, chunks=(4, 1, 10, 10))
    like = xr.DataArray(data, dims=("t", "c", "y", "x"), attrs={"channel": 3})
    hints = omero_hints(like, dtype=np.dtype("uint8"), name="image")
    assert [c["label"] for c in hints["channels"]] == ["image channel 3", "image channel 4"]
    window = hints["channels"][0]["window"]
    # numpy: the whole array is one chunk; dask: the chunk holding the middle frame of channel 0
    sample = values if backend == "numpy" else values[8:12, 0]
    assert window["start"] == pytest.approx(np.percentile(sample, 0.1))
    assert window["end"] == pytest.approx(np.percentile(sample, 99.9))
    # a float input's range is the sample's, clipped to what the uint8 output can hold
    low, high = max(float(sample.min()), 0.0), min(float(sample.max()), 255.0)
    assert (window["min"], window["max"]) == (pytest.approx(low), pytest.approx(high))
    empty = xr.DataArray(np.full((16, 4, 4), np.nan, np.float32), dims=("t", "y", "x"))
    window = omero_hints(empty, dtype=np.dtype("float32"))["channels"][0]["window"]
    assert window == {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}


def test_record_differences_name_what_sets_two_runs_apart():
    from srdvol.ngff.provenance import record_differences

    earlier = {
        "run_id": "a",
        "created": "then",
        "version": "1",
        "training": {"steps": 200, "lr": 1e-3},
        "parameters": {"overlap": 0.25, "anchor": 4.0},
    }
    # a check made before training knows no prediction parameters: those are not compared
    now = {"run_id": "b", "created": "now", "version": "1", "training": {"steps": 400, "lr": 1e-3}}
    assert record_differences(earlier, now) == ["training.steps=200 where this run has 400"]
    plain = {**now, "training": earlier["training"], "parameters": {"overlap": 0.5}}
    assert record_differences(earlier, plain) == [
        "parameters.anchor=4.0 where this run has none",
        "parameters.overlap=0.25 where this run has 0.5",
    ]
    assert record_differences(earlier, plain, limit=1) == [
        "parameters.anchor=4.0 where this run has none"
    ]
    assert record_differences(earlier, {**earlier, "run_id": "c", "created": "x"}) == []


def test_refusing_another_runs_output_names_the_difference(tmp_path, make_image):
    path, _ = make_image(shape=(16, 8, 8))
    out = str(tmp_path / "out.zarr")
    like = open_image(path)
    create_output(out, like=like, provenance={"parameters": {"overlap": 0.25}})
    with pytest.raises(OutputExistsError, match=r"written with parameters\.overlap=0\.25 where"):
        check_output(out, like=like, provenance={"parameters": {"overlap": 0.5}})
