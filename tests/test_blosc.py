"""Truncated Blosc chunks fail every time (numcodecs alone decodes whatever memory follows)."""

from __future__ import annotations

import numcodecs
import numpy as np
import pytest
import zarr

from srdvol.errors import DataError
from srdvol.ngff.blosc import CheckedBlosc, CheckedBloscCodec, check_blosc_frame
from srdvol.ngff.read import open_image


def _frame() -> bytes:
    data = np.random.default_rng(0).integers(0, 1000, size=4096).astype("uint16")
    return numcodecs.Blosc(cname="zstd", shuffle=numcodecs.Blosc.BITSHUFFLE).encode(data)


def test_a_short_view_of_a_whole_frame_is_refused_though_plain_numcodecs_decodes_it():
    frame = _frame()
    short = memoryview(frame)[: len(frame) // 2]  # the missing half lies right behind it
    plain = numcodecs.Blosc().decode(short)  # what made the failure depend on memory
    assert plain == numcodecs.Blosc().decode(frame)
    with pytest.raises(ValueError, match=rf"{len(frame) // 2} of the {len(frame)} bytes"):
        CheckedBlosc().decode(short)
    with pytest.raises(ValueError, match="shorter than the 16-byte blosc header"):
        check_blosc_frame(frame[:10])
    check_blosc_frame(frame)  # a whole frame passes


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_truncated_chunk_file_is_named_on_every_read(tmp_path, zarr_format):
    path = tmp_path / "a.zarr"
    compressor = numcodecs.Blosc() if zarr_format == 2 else zarr.codecs.BloscCodec()
    array = zarr.create_array(
        path,
        shape=(32, 16, 16),
        chunks=(16, 16, 16),
        dtype="uint16",
        zarr_format=zarr_format,
        compressors=compressor,
    )
    array[:] = np.arange(32 * 16 * 16, dtype="uint16").reshape(32, 16, 16)
    chunk = path / ("1.0.0" if zarr_format == 2 else "c/1/0/0")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    opened = zarr.open_array(path, mode="r")
    codecs = [opened.metadata.compressor] if zarr_format == 2 else opened.metadata.codecs
    assert any(isinstance(c, CheckedBlosc | CheckedBloscCodec) for c in codecs)
    image = open_image(path, axes="tyx")
    for _ in range(3):
        with pytest.raises(DataError, match="the chunk at t=16:32, y=0:16, x=0:16 cannot be"):
            image.data[16:].compute(scheduler="threads")
    assert int(image.data[:16].sum().compute()) == int(np.arange(16 * 256).sum())
