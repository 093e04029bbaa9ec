"""Tests for srdvol.ngff.storecheck: missing chunks from one listing, write probes, free space."""

from __future__ import annotations

import errno
import os
import shutil
import uuid

import fsspec
import numpy as np
import pytest
import zarr

from srdvol.errors import DataError, OutputPathError
from srdvol.ngff.read import open_image
from srdvol.ngff.storecheck import (
    check_chunks,
    check_free_space,
    find_missing_chunks,
    probe_writable,
    storage_errors,
)


def _array(location, *, shape=(8, 6, 6), chunks=(2, 3, 3), zarr_format=3, **options):
    array = zarr.create_array(
        location,
        shape=shape,
        chunks=chunks,
        dtype="uint16",
        zarr_format=zarr_format,
        fill_value=0,
        **options,
    )
    array[...] = 1 + np.arange(np.prod(shape), dtype="uint16").reshape(shape) % 7
    return array


def _remove_chunk(location: str, array: zarr.Array, index: tuple[int, ...]) -> None:
    fs, root = fsspec.core.url_to_fs(location)
    fs.rm_file(f"{root.rstrip('/')}/{array.metadata.encode_chunk_key(index)}")


@pytest.mark.parametrize(
    ("zarr_format", "options"),
    [
        (3, {}),
        (3, {"chunk_key_encoding": {"name": "default", "separator": "."}}),
        (3, {"chunk_key_encoding": {"name": "v2", "separator": "/"}}),
        (2, {}),
        (2, {"chunk_key_encoding": {"name": "v2", "separator": "/"}}),
    ],
    ids=["v3", "v3-dot", "v3-v2keys", "v2-dot", "v2-slash"],
)
def test_missing_chunks_are_found_for_every_key_encoding(tmp_path, zarr_format, options):
    location = str(tmp_path / "a.zarr")
    array = _array(location, zarr_format=zarr_format, **options)
    complete = find_missing_chunks(location, dims="tyx")
    assert complete is not None and (complete.count, complete.total) == (0, 16)
    _remove_chunk(location, array, (3, 1, 0))
    _remove_chunk(location, array, (1, 0, 1))
    found = find_missing_chunks(location, dims="tyx")
    assert (found.count, found.total) == (2, 16)
    # positions in array coordinates, in C order of the chunk grid
    assert found.positions == (
        {"t": (2, 4), "y": (0, 3), "x": (3, 6)},
        {"t": (6, 8), "y": (3, 6), "x": (0, 3)},
    )
    assert found.stored == {"t": (0, 2), "y": (0, 3), "x": (0, 3)}
    assert "2 of the 16 chunks are missing (at t=2:4, y=0:3, x=3:6; t=6:8" in found.describe()


def test_edge_chunks_and_shards_and_an_enlarged_shape(tmp_path):
    # 7 frames in chunks of 2: the last chunk is short; the position is clipped to the shape.
    location = str(tmp_path / "edge.zarr")
    array = _array(location, shape=(7, 6, 6))
    _remove_chunk(location, array, (3, 0, 0))
    found = find_missing_chunks(location, dims="tyx")
    assert found.positions[0] == {"t": (6, 7), "y": (0, 3), "x": (0, 3)}

    # a sharded array is listed shard by shard
    sharded = str(tmp_path / "sharded.zarr")
    array = _array(sharded, shape=(8, 6, 6), chunks=(1, 3, 3), shards=(4, 6, 6))
    assert find_missing_chunks(sharded, dims="tyx").total == 2
    _remove_chunk(sharded, array, (1, 0, 0))
    found = find_missing_chunks(sharded, dims="tyx")
    assert (found.count, found.positions[0]) == (1, {"t": (4, 8), "y": (0, 6), "x": (0, 6)})

    # a shape enlarged in the metadata: the new chunks were never written
    grown = str(tmp_path / "grown.zarr")
    _array(grown, shape=(4, 6, 6)).resize((8, 6, 6))
    assert find_missing_chunks(grown, dims="tyx").count == 8


def test_only_the_selected_channel_counts(tmp_path, make_image):
    path, _ = make_image(axes="tcyx", shape=(16, 3, 8, 8), chunks=(8, 1, 8, 8))
    level = open_image(path).attrs["array_path"]
    array = zarr.open_array(f"{path}/{level}", mode="r")
    _remove_chunk(f"{path}/{level}", array, (1, 2, 0, 0))  # channel 2, frames 8:16
    assert find_missing_chunks(path, array_path=level, dims="tcyx", region={"c": (0, 1)}).count == 0
    found = find_missing_chunks(path, array_path=level, dims="tcyx", region={"c": (2, 3)})
    assert (found.count, found.total) == (1, 2)
    assert found.positions[0] == {"t": (8, 16), "c": (2, 3), "y": (0, 8), "x": (0, 8)}
    with pytest.raises(DataError, match=r"1 of the 2 chunks is missing \(at t=8:16, c=2:3"):
        check_chunks(open_image(path, channel=2))
    assert check_chunks(open_image(path, channel=2), allow_missing=True).count == 1
    assert check_chunks(open_image(path, channel=0)).count == 0


def test_fsspec_urls_are_listed_with_one_call(monkeypatch):
    location = f"memory://checks-{uuid.uuid4().hex}/big.zarr"
    shape, chunks = (40, 50, 50), (1, 1, 1)  # 100,000 chunk keys
    array = zarr.create_array(location, shape=shape, chunks=chunks, dtype="uint8", fill_value=0)
    array[0, 0, 0] = 1
    fs = fsspec.filesystem("memory")
    root = location.removeprefix("memory://")
    stored = fs.cat_file(f"{root}/c/0/0/0")
    # every chunk but the last, written as the store's objects (zarr would take minutes)
    fs.pipe({f"{root}/c/{t}/{y}/{x}": stored for t, y, x in np.ndindex(shape)})
    fs.rm_file(f"{root}/c/39/49/49")
    calls = []
    original = type(fs).find

    def counted(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(fs), "find", counted)
    found = find_missing_chunks(location, dims="tyx")
    assert (found.count, found.total) == (1, 100_000)
    assert found.positions == ({"t": (39, 40), "y": (49, 50), "x": (49, 50)},)
    assert len(calls) == 1  # one listing, never one request per chunk
    # fs.rm is quadratic in the number of keys of a memory store: drop them directly
    bucket = "/" + root.split("/")[0]
    for key in [k for k in fs.store if k.startswith(bucket)]:
        del fs.store[key]
    fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.startswith(bucket)]


def test_a_chunk_that_cannot_be_decoded_is_named_before_missing_ones(tmp_path):
    # The metadata claims chunks of 1 frame where the data holds 2: half the grid looks
    # missing, but the read of a stored chunk names the real problem first.
    location = str(tmp_path / "a.zarr")
    _array(location, shape=(16, 6, 6))
    meta = tmp_path / "a.zarr" / "zarr.json"
    meta.write_text(
        meta.read_text().replace('"chunk_shape": [\n        2,', '"chunk_shape": [\n        1,')
    )
    image = open_image(location, axes="tyx")
    with pytest.raises(DataError, match=r"a.zarr/c/0/0/0: the chunk at t=0:1.*chunk shape"):
        check_chunks(image)


def test_probe_leaves_nothing_and_names_unwritable_locations(tmp_path):
    before = sorted(os.listdir(tmp_path))
    probe_writable(tmp_path / "new" / "deeper" / "out.zarr")  # probes tmp_path itself
    probe_writable(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, so no folder can be created there"):
        probe_writable(blocker / "out.zarr")
    url = f"memory://probe-{uuid.uuid4().hex}/out.zarr"
    probe_writable(url)
    fs = fsspec.filesystem("memory")
    assert not fs.find(url.removeprefix("memory://").split("/")[0])


def test_free_space_is_compared_with_the_output_size(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert check_free_space(tmp_path / "out.zarr", needed=1024) is None
    warning = check_free_space(tmp_path / "out.zarr", needed=int(free * 1.5))
    assert warning is not None and "fits only if the data compresses well" in warning
    with pytest.raises(OutputPathError, match=r"out.zarr: the disk has .* free and the output"):
        check_free_space(tmp_path / "out.zarr", needed=4 * free)
    assert check_free_space("memory://anything/out.zarr", needed=10**18) is None
    (tmp_path / "resumed.zarr").mkdir()  # an existing output is partly written: not checked
    assert check_free_space(tmp_path / "resumed.zarr", needed=10**18) is None


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "the disk filled up"), (errno.EROFS, "became unwritable")],
)
def test_write_errors_become_one_sentence_and_others_pass(tmp_path, code, words):
    with pytest.raises(OutputPathError, match=words) as caught:
        with storage_errors("out.zarr", resume="run the same command again to resume"):
            raise OSError(code, os.strerror(code), str(tmp_path / "out.zarr" / "s0" / "c"))
    message = str(caught.value)
    assert message.startswith("out.zarr: ") and message.endswith("to resume.")
    with pytest.raises(FileNotFoundError):  # not a problem of the output location
        with storage_errors("out.zarr", resume="rerun"):
            raise FileNotFoundError(errno.ENOENT, "gone")
