"""Tests for srdvol.ngff.pyramid: level transforms, shapes, the 2x2 mean against a loop, pyramid
metadata for each NGFF version (validated with ome-zarr-models), and writes from a cluster."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import zarr
from conftest import validate_ngff

from srdvol.ngff.pyramid import level_datasets, output_nbytes, pyramid_shapes, write_pyramid
from srdvol.ngff.read import open_image
from srdvol.ngff.write import create_output, open_output_array
from srdvol.options import OutputOptions


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


@pytest.mark.slow
def test_parallel_writes_from_worker_processes_lose_nothing(tmp_path, make_image):
    from distributed import Client, LocalCluster

    path, data = make_image(axes="tzyx", shape=(32, 2, 48, 40), chunks=(8, 1, 16, 16))
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    array = create_output(out, like=image, chunks={"t": 8, "y": 16, "x": 16}, provenance={})
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
    validate_ngff(out)


@pytest.mark.parametrize("dtype", ["float32", "input"])
def test_pyramid_levels_match_numpy_reference(tmp_path, make_image, ngff, dtype):
    path, data = make_image(axes="tzyx", shape=(16, 2, 37, 21), dtype="uint16")
    image = open_image(path)
    out = str(tmp_path / "out.zarr")
    options = OutputOptions(dtype=dtype, ngff=ngff)
    array = create_output(out, like=image, options=options, chunks={"y": 8, "x": 8}, provenance={})
    array[...] = data
    attrs_before = zarr.open_group(out, mode="r").attrs.asdict()
    levels = write_pyramid(out, min_size=6)
    shapes = pyramid_shapes(data.shape, ("t", "z", "y", "x"), min_size=6)
    assert [s[2:] for s in shapes] == [(19, 11), (10, 6), (5, 3)]
    assert levels == ["s0", "s1", "s2", "s3"]
    expected = data.astype(np.float64)
    for k in range(1, 4):
        expected = _reference_halve(expected, 2, 3)
        got = open_output_array(out, level=k)[...]
        assert got.dtype == array.dtype
        assert got.shape == shapes[k - 1]
        if dtype == "input":
            # each level is rounded before the next is computed from it
            expected = np.rint(expected)
            np.testing.assert_array_equal(got, expected.astype(np.uint16))
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5)
    validate_ngff(out)
    level2 = open_image(out, level=2)
    assert level2.attrs["scale"]["y"] == pytest.approx(4 * image.attrs["scale"]["y"])
    # pixel centres stay in place: level-2 pixel 0 covers level-0 pixels 0..3
    assert level2.attrs["translation"]["x"] == pytest.approx(1.5 * image.attrs["scale"]["x"])
    # a second call rebuilds the same levels, and fewer levels drop the stale ones
    assert write_pyramid(out, min_size=20) == ["s0", "s1"]
    group = zarr.open_group(out, mode="r")
    assert sorted(group.array_keys()) == ["s0", "s1"]
    validate_ngff(out)
    # the rewrite touched the multiscales only: omero hints and provenance are as created
    attrs = group.attrs.asdict()
    assert attrs["srdvol"] == attrs_before["srdvol"]
    ome, ome_before = (
        (attrs["ome"], attrs_before["ome"]) if ngff == "0.5" else (attrs, attrs_before)
    )
    assert ome["omero"] == ome_before["omero"]
    assert len(ome["multiscales"][0]["datasets"]) == 2


def test_level_transforms_keep_pixel_centres():
    datasets = level_datasets(
        ("t", "y", "x"), scale=[2.0, 0.5, 0.25], translation=[1.0, 3.0, -1.0], levels=3
    )
    assert [d[0] for d in datasets] == ["s0", "s1", "s2"]
    assert datasets[0][1:] == ([2.0, 0.5, 0.25], [1.0, 3.0, -1.0])
    # level k: y and x scaled by 2**k, shifted by (2**k - 1) / 2 level-0 pixels; t unchanged
    assert datasets[2][1] == [2.0, 2.0, 1.0]
    assert datasets[2][2] == [1.0, 3.0 + 1.5 * 0.5, -1.0 + 1.5 * 0.25]


def test_pyramid_shapes_and_bytes():
    shapes = pyramid_shapes((10, 300, 129), ("t", "y", "x"))
    assert shapes == [(10, 150, 65), (10, 75, 33), (10, 38, 17)]  # until the larger side <= 64
    assert pyramid_shapes((10, 64, 64), ("t", "y", "x")) == []
    # a 1-pixel-wide plane cannot be halved further
    assert pyramid_shapes((4, 1, 500), ("t", "y", "x"), min_size=8) == []
    levels = 10 * (300 * 129 + 150 * 65 + 75 * 33 + 38 * 17)
    assert output_nbytes((10, 300, 129), ("t", "y", "x"), "float32") == 4 * levels
