"""Tests of srdvol.training.patches: lazy random training patches from a zarr store."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

from srdvol.errors import ConfigError, InputError
from srdvol.training.patches import PatchSampler


class CountingStore(WrapperStore[LocalStore]):
    """A read-only store wrapper that sums the bytes every ``get`` returns."""

    bytes_read = 0
    chunk_gets = 0

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            type(self).bytes_read += len(buf)
            if not key.endswith("zarr.json"):
                type(self).chunk_gets += 1
        return buf


def write(path: Path, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    arr = zarr.create_array(
        str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=None
    )
    arr[...] = data


def image(path: Path, dims: str, store: object | None = None) -> xr.DataArray:
    ro = zarr.open_array(store or str(path), mode="r")
    return xr.DataArray(da.from_zarr(ro), dims=tuple(dims), attrs={"source": str(path)})


@pytest.fixture
def movie(tmp_path: Path) -> tuple[np.ndarray, xr.DataArray]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(40, 3, 20, 24), dtype=np.uint16)
    write(tmp_path / "m.zarr", data, (8, 1, 8, 8))
    return data, image(tmp_path / "m.zarr", "tzyx")


def test_patches_match_numpy_slices(movie: tuple[np.ndarray, xr.DataArray]) -> None:
    data, img = movie
    sampler = PatchSampler(img, patch=(16, 8, 10), seed=7, batch_size=5)
    replay = PatchSampler(img, patch=(16, 8, 10), seed=7)
    batch = sampler.sample()
    assert batch.shape == (5, 16, 8, 10)
    assert batch.dtype == np.float32
    for patch in batch:
        movie_index, (t, y, x) = replay.draw()
        expected = data[t : t + 16, movie_index["z"], y : y + 8, x : x + 10]
        np.testing.assert_array_equal(patch, expected.astype(np.float32))


def test_positions_cover_movies_and_edges(movie: tuple[np.ndarray, xr.DataArray]) -> None:
    _, img = movie
    sampler = PatchSampler(img, patch=(16, 8, 8), seed=1)
    draws = [sampler.draw() for _ in range(600)]
    assert {m["z"] for m, _ in draws} == {0, 1, 2}
    starts_t = [s[0] for _, s in draws]
    assert min(starts_t) == 0 and max(starts_t) == 40 - 16
    assert max(s[2] for _, s in draws) == 24 - 8


def test_reads_only_the_chunks_a_patch_touches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 60000, size=(160, 4, 96, 96), dtype=np.uint16)
    path = tmp_path / "big.zarr"
    write(path, data, (16, 1, 32, 32))
    store = CountingStore(LocalStore(str(path), read_only=True))
    img = image(path, "tzyx", store=store)
    CountingStore.bytes_read = 0
    CountingStore.chunk_gets = 0
    sampler = PatchSampler(img, patch=(16, 16, 16), seed=0, batch_size=4)
    batch = sampler.sample()
    chunk_bytes = 16 * 32 * 32 * 2
    # A 16^3 patch touches at most 2 x 2 x 2 chunks of 16 x 32 x 32.
    assert 0 < CountingStore.chunk_gets <= 4 * 8
    assert CountingStore.bytes_read <= 4 * 8 * chunk_bytes
    assert CountingStore.bytes_read < data.nbytes / 10
    assert batch.shape == (4, 16, 16, 16)


def test_ranks_draw_different_reproducible_streams(movie: tuple[np.ndarray, xr.DataArray]) -> None:
    _, img = movie
    a0 = PatchSampler(img, patch=(16, 8, 8), seed=3, rank=0, world_size=2)
    a1 = PatchSampler(img, patch=(16, 8, 8), seed=3, rank=1, world_size=2)
    b0 = PatchSampler(img, patch=(16, 8, 8), seed=3, rank=0, world_size=2)
    draws0 = [a0.draw() for _ in range(10)]
    assert draws0 == [b0.draw() for _ in range(10)]
    assert draws0 != [a1.draw() for _ in range(10)]


def test_state_round_trip_replays_the_stream(movie: tuple[np.ndarray, xr.DataArray]) -> None:
    _, img = movie
    sampler = PatchSampler(img, patch=(16, 8, 8), seed=4, batch_size=2)
    sampler.sample()
    state = json.loads(json.dumps(sampler.state_dict()))
    after = [sampler.sample() for _ in range(3)]
    fresh = PatchSampler(img, patch=(16, 8, 8), seed=99, batch_size=2)
    fresh.load_state_dict(state)
    for expected in after:
        np.testing.assert_array_equal(fresh.sample(), expected)
    other_rank = PatchSampler(img, patch=(16, 8, 8), seed=4, rank=1, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        other_rank.load_state_dict(state)


def test_short_spatial_axes_are_reflect_padded(tmp_path: Path) -> None:
    data = np.arange(16 * 5 * 3, dtype=np.float32).reshape(16, 5, 3)
    write(tmp_path / "s.zarr", data, (16, 5, 3))
    sampler = PatchSampler(image(tmp_path / "s.zarr", "tyx"), patch=(16, 8, 6), seed=0)
    patch = sampler.sample(1)[0]
    expected = np.pad(data, [(0, 0), (0, 3), (0, 3)], mode="reflect")
    np.testing.assert_array_equal(patch, expected)


def test_single_pixel_axis_is_repeated(tmp_path: Path) -> None:
    data = np.arange(16 * 4, dtype=np.float32).reshape(16, 1, 4)
    write(tmp_path / "p.zarr", data, (16, 1, 4))
    patch = PatchSampler(image(tmp_path / "p.zarr", "tyx"), patch=(16, 2, 4)).sample(1)[0]
    np.testing.assert_array_equal(patch[:, 1], data[:, 0])


def test_other_axis_orders_come_back_as_tyx(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=(2, 12, 9, 16)).astype(np.float32)  # z y x t
    write(tmp_path / "o.zarr", data, (1, 12, 9, 16))
    sampler = PatchSampler(image(tmp_path / "o.zarr", "zyxt"), patch=(16, 12, 9), seed=0)
    patch = sampler.sample(1)[0]
    assert any(np.array_equal(patch, np.transpose(data[z], (2, 0, 1))) for z in range(2))


def test_too_few_frames_is_an_input_error(tmp_path: Path) -> None:
    write(tmp_path / "f.zarr", np.zeros((12, 8, 8), np.uint8), (12, 8, 8))
    with pytest.raises(InputError, match="12 frames, fewer than the patch's 16"):
        PatchSampler(image(tmp_path / "f.zarr", "tyx"), patch=(16, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch": (16, 8)}, "three positive"),
        ({"patch": (16, 0, 8)}, "three positive"),
        ({"patch": (16, 8, 8), "rank": 2, "world_size": 2}, "rank 2"),
        ({"patch": (16, 8, 8), "batch_size": 0}, "not positive"),
    ],
)
def test_bad_arguments(
    movie: tuple[np.ndarray, xr.DataArray], kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        PatchSampler(movie[1], **kwargs)  # type: ignore[arg-type]


def test_reading_ahead_gives_the_same_batches_and_resumes_the_same(
    movie: tuple[np.ndarray, xr.DataArray],
) -> None:
    _, img = movie
    plain = PatchSampler(img, patch=(16, 8, 8), seed=5, batch_size=3)
    ahead = PatchSampler(img, patch=(16, 8, 8), seed=5, batch_size=3, read_ahead=True)
    try:
        for _ in range(3):
            np.testing.assert_array_equal(ahead.sample(), plain.sample())
        # the state is the returned batches', not the one being read ahead
        assert ahead.state_dict() == plain.state_dict()
        state = json.loads(json.dumps(ahead.state_dict()))
        # another batch size, then single draws: the positions read ahead go back to the stream
        np.testing.assert_array_equal(ahead.sample(batch_size=2), plain.sample(batch_size=2))
        assert [ahead.draw() for _ in range(4)] == [plain.draw() for _ in range(4)]
        expected = [plain.sample() for _ in range(2)]
        resumed = PatchSampler(img, patch=(16, 8, 8), seed=0, batch_size=3, read_ahead=True)
        resumed.load_state_dict(state)
        replay = PatchSampler(img, patch=(16, 8, 8), seed=0, batch_size=3)
        replay.load_state_dict(state)
        for _ in range(2):
            np.testing.assert_array_equal(resumed.sample(), replay.sample())
        resumed.close()
        assert resumed.state_dict() == replay.state_dict()
        np.testing.assert_array_equal(resumed.sample(), replay.sample())  # closed: reads now
        assert len(expected) == 2
    finally:
        ahead.close()


class _SlowReads:
    """A (t, y, x) array whose reads are noted (and take a while)."""

    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads = 0

    def __getitem__(self, key):
        if all(k.stop > k.start for k in key):
            import time

            time.sleep(0.01)
            self.reads += 1
        return self.data[key]


def test_the_next_batch_is_read_while_the_caller_works() -> None:
    import time

    slow = _SlowReads(np.random.default_rng(2).integers(0, 9, size=(64, 16, 16), dtype=np.uint16))
    img = xr.DataArray(da.from_array(slow, chunks=(1, 16, 16), asarray=False), dims=("t", "y", "x"))
    sampler = PatchSampler(img, patch=(16, 16, 16), seed=0, batch_size=2, read_ahead=True)
    # one frame per chunk: a batch reads the distinct frames of its two patches
    replay = PatchSampler(img, patch=(16, 16, 16), seed=0)
    frames = []
    for _ in range(3):
        starts = [replay.draw()[1][0] for _ in range(2)]
        frames.append(len({t for s in starts for t in range(s, s + 16)}))

    def reads_reach(count: int) -> bool:
        for _ in range(600):  # no sample() call meanwhile: the reading thread reads
            if slow.reads >= count:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        return slow.reads == count

    try:
        sampler.sample()
        assert reads_reach(frames[0] + frames[1])
        sampler.sample()  # the batch read ahead, and the next one started
        assert reads_reach(sum(frames))
    finally:
        sampler.close()
