"""Tests for srdvol.dask (graph, writer, runners, ledger): the lazy overlap-add image, the wave
writer and its ledger."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from distributed.diagnostics.plugin import SchedulerPlugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srdvol.dask import writer
from srdvol.dask.graph import BlockDataError, Ledger, denoise, write
from srdvol.errors import (
    ConfigError,
    DataError,
    InputError,
    OutputExistsError,
    UnsupportedDtypeError,
)
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import AffineModel, PatchMeanModel


def noisy(shape, seed=0):
    return np.random.default_rng(seed).gamma(2.0, 30.0, size=shape).astype(np.float32)


@given(
    t=st.integers(16, 36),
    z=st.integers(1, 2),
    y=st.integers(2, 24),
    x=st.integers(2, 24),
    ct=st.integers(2, 12),
    cy=st.integers(1, 10),
    cx=st.integers(1, 10),
    pt=st.integers(1, 20),
    py=st.integers(1, 12),
    px=st.integers(1, 12),
    bt=st.integers(1, 30),
    by=st.integers(1, 20),
    bx=st.integers(1, 20),
    overlap=st.floats(0, 0.8),
    kind=st.sampled_from(["tent", "cos2"]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_affine_known_answer_any_blocks(
    t, z, y, x, ct, cy, cx, pt, py, px, bt, by, bx, overlap, kind
):
    arr = noisy((t, z, y, x), seed=t + y + x)
    lazy = denoise(
        da.from_array(arr, chunks=(ct, 1, cy, cx)),
        AffineModel(2, 1),
        dims="tzyx",
        patch=(pt, py, px),
        overlap=overlap,
        block=(bt, by, bx),
        window=kind,
    )
    out = lazy.compute(scheduler="sync")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 2 * arr + 1, rtol=2e-7, atol=0)  # float32 rounding


def test_seamless_and_block_size_invariant():
    arr = noisy((40, 2, 37, 33), seed=1)
    kw = {"patch": (16, 9, 8), "overlap": 0.3, "dims": "tzyx", "chunks": (4, 1, 5, 5)}
    ref = predict_array(arr, PatchMeanModel(), patch=kw["patch"], overlap=0.3, dims="tzyx")
    results = []
    for block in [(16, 10, 10), (20, 15, 20), (40, 37, 33)]:
        lazy = denoise(da.from_array(arr, chunks=(8, 1, 5, 5)), PatchMeanModel(), block=block, **kw)
        assert lazy.numblocks[1] == 2  # each z plane is its own block
        results.append(lazy.compute(scheduler="sync"))
    assert len({r.tobytes() for r in results}) == 1  # identical for every block size
    np.testing.assert_array_equal(results[0], ref)  # and equal to the whole-array pass
    # And the patch-dependent stand-in really changes values across patches.
    assert np.ptp(results[0] - arr) > 1.0


def test_xarray_in_xarray_out():
    arr = noisy((16, 12, 10))
    image = xr.DataArray(
        da.from_array(arr, chunks=(8, 6, 5)),
        dims=("t", "y", "x"),
        coords={"t": np.arange(16) * 0.5},
        attrs={"source": "x.zarr"},
        name="img",
    )
    out = denoise(image, AffineModel(2, 1), patch=(16, 6, 6), block=(16, 6, 5))
    assert isinstance(out, xr.DataArray)
    assert out.dims == image.dims and out.attrs == image.attrs and out.name == "img"
    np.testing.assert_array_equal(out.coords["t"], image.coords["t"])
    assert out.dtype == np.float32
    assert out.data.chunks == ((16,), (6, 6), (5, 5))
    np.testing.assert_allclose(out.values, 2 * arr + 1, rtol=2e-6)


def test_map_overlap_graph_stays_small():
    arr = da.zeros((64, 4, 256, 256), chunks=(16, 1, 64, 64), dtype=np.uint16)
    lazy = denoise(arr, AffineModel(), dims="tzyx", patch=(16, 32, 32), block=(32, 128, 128))
    tasks = len(dict(lazy.__dask_graph__()))
    assert tasks / np.prod(lazy.numblocks) < 40


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"array": np.zeros((16, 4, 4), np.float32)}, InputError, "dims"),
        ({"array": np.zeros((15, 4, 4), np.float32), "dims": "tyx"}, DataError, "15 frames"),
        (
            {"array": np.zeros((16, 4, 4), np.complex64), "dims": "tyx"},
            UnsupportedDtypeError,
            "complex",
        ),
        (
            {"array": np.zeros((16, 4, 4), np.float32), "dims": "tyx", "patch": None},
            ConfigError,
            "patch",
        ),
        ({"array": np.zeros((16, 4, 4), np.float32), "dims": "tzyx"}, InputError, "4-D|3-D"),
        (
            {"array": np.zeros((16, 4, 4), np.float32), "dims": "tyx", "block": (4, 4)},
            ConfigError,
            "block",
        ),
    ],
)
def test_denoise_argument_errors(kwargs, error, match):
    kwargs = {"patch": (16, 4, 4), **kwargs}
    array = kwargs.pop("array")
    with pytest.raises(error, match=match):
        denoise(array, AffineModel(), **kwargs)


def test_nan_block_is_named():
    arr = noisy((16, 8, 8))
    arr[3, 6, 7] = np.nan
    lazy = denoise(
        arr, AffineModel(), dims="tyx", patch=(16, 4, 4), chunks=(16, 4, 4), block=(16, 4, 4)
    )
    with pytest.raises(BlockDataError, match=r"block \(0, 1, 1\).*NaN"):
        lazy.compute(scheduler="sync")


class OverflowsOnBright:
    """A stand-in model that overflows to Inf on patches brighter than 1000 (finite input)."""

    def __call__(self, patches):
        bright = patches.max(axis=(1, 2, 3), keepdims=True) > 1000
        return np.where(bright, np.float32(np.inf), patches).astype(np.float32)


def test_a_block_whose_prediction_is_not_finite_stops_the_run_and_is_named(tmp_path):
    arr = noisy((16, 8, 8))
    arr[:, 4:, 4:] += 5000  # only the patches of block (0, 1, 1) see it
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 4, 4))
    lazy = denoise(
        arr,
        OverflowsOnBright(),
        dims="tyx",
        patch=(16, 4, 4),
        chunks=(16, 4, 4),
        block=(16, 4, 4),
        overlap=0,
    )
    pattern = r"block \(0, 1, 1\) \(t=0:16, y=4:8, x=4:8\): the model's output holds 256 NaN"
    with pytest.raises(BlockDataError, match=pattern):
        write(lazy, out, ledger=tmp_path / "l.json")
    assert not out[:, 4:, 4:].any()  # nothing of that block was written


# --- writer -----------------------------------------------------------------------------------


def make_output(path, shape, chunks, dtype="float32"):
    return zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0)


def test_writer_threads_resume_and_wave(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "LEDGER_INTERVAL", 0)
    arr = noisy((32, 2, 24, 20), seed=2)
    out = make_output(tmp_path / "out.zarr", arr.shape, (8, 1, 8, 10))
    lazy = denoise(
        da.from_array(arr, chunks=(8, 1, 8, 10)),
        PatchMeanModel(),
        dims="tzyx",
        patch=(16, 6, 6),
        chunks=out.chunks,
        block=(16, 8, 10),
    )
    ledger = tmp_path / "out.zarr" / "srdvol_ledger.json"
    seen = []
    report = write(lazy, out, ledger=ledger, wave=3, threads=2, progress=seen.append)
    total = int(np.prod(lazy.numblocks))
    assert (report.total, report.computed, report.skipped) == (total, total, 0)
    assert report.voxels == arr.size
    assert 1 <= report.max_in_flight <= 3
    assert seen[-1].done == total and seen[-1].eta == 0
    blocks = [p.done for p in seen if p.patches == 0 or p.computed > 0]
    assert sorted(set(blocks)) == list(range(total + 1))  # the totals, then every block
    assert all(b.computed >= a.computed for a, b in itertools.pairwise(seen))
    ref = predict_array(arr, PatchMeanModel(), patch=(16, 6, 6), overlap=0.25, dims="tzyx")
    np.testing.assert_allclose(out[...], ref, rtol=1e-5)
    assert (
        Ledger(
            ledger,
            nblocks=lazy.numblocks,
            fingerprint=json.loads(ledger.read_text())["fingerprint"],
        ).count
        == total
    )
    again = write(lazy, out, ledger=ledger, wave=3)
    assert (again.computed, again.skipped) == (0, total)
    with pytest.raises(OutputExistsError, match="other parameters") as refused:
        write(lazy, out, ledger=ledger, run_id="another run")
    # default blocks follow the workers' memory: the message names the blocks recorded
    # the library names the parameter; the command line shows it as --block
    assert "block (the run used blocks of (16, 1, 8, 10)" in str(refused.value)
    assert "--block (the run used" in refused.value.command_line_message()


def _one_slow_block(tmp_path, name):
    """One block of 27 patches that the model predicts 2 at a time, 0.15 s per call (2 s)."""
    arr = noisy((32, 16, 16), seed=6)
    out = make_output(tmp_path / name, arr.shape, (32, 16, 16))
    lazy = denoise(
        da.from_array(arr, chunks=(32, 16, 16)),
        AffineModel(2, 1, delay=0.15, batch_size=2),
        dims="tyx",
        patch=(16, 8, 8),
        overlap=0.5,
        chunks=out.chunks,
    )
    assert lazy.numblocks == (1, 1, 1)
    return arr, out, lazy


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_a_long_block_reports_its_patches_before_it_finishes(tmp_path, request, where):
    arr, out, lazy = _one_slow_block(tmp_path, "o.zarr")
    client = request.getfixturevalue("client") if where == "cluster" else None
    seen = []
    report = write(lazy, out, client=client, progress=seen.append)
    assert report.computed == 1
    running = [p for p in seen if p.computed == 0 and p.patches > 0]
    assert running, seen  # the only block was seen to advance while it ran
    assert all(b.patches >= a.patches for a, b in itertools.pairwise(seen))
    assert seen[-1].patches <= 27
    np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)


def test_writer_refuses_unaligned_blocks(tmp_path):
    arr = noisy((32, 20, 20))
    out = make_output(tmp_path / "o.zarr", arr.shape, (32, 20, 20))
    lazy = denoise(
        arr, AffineModel(), dims="tyx", patch=(16, 4, 4), chunks=(16, 10, 10), block=(16, 10, 10)
    )
    with pytest.raises(ConfigError, match="not multiples of the output chunks"):
        write(lazy, out)
    assert not np.any(out[...])  # nothing was written


def test_writer_aligns_to_shards(tmp_path):
    arr = noisy((32, 16, 16))
    out = zarr.create_array(
        str(tmp_path / "s.zarr"),
        shape=arr.shape,
        chunks=(8, 4, 4),
        shards=(16, 8, 8),
        dtype="float32",
    )
    chunk_aligned = denoise(
        arr, AffineModel(2, 1), dims="tyx", patch=(16, 4, 4), chunks=out.chunks, block=(8, 4, 4)
    )
    with pytest.raises(ConfigError, match="chunks/shards"):
        write(chunk_aligned, out)
    lazy = denoise(
        arr, AffineModel(2, 1), dims="tyx", patch=(16, 4, 4), chunks=out.shards, block=(8, 4, 4)
    )
    assert write(lazy, out, threads=2, wave=4).computed == 8
    np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)


def test_writer_integer_output_rounds_and_clips(tmp_path):
    arr = np.linspace(0, 200, 16 * 4 * 4, dtype=np.float32).reshape(16, 4, 4)
    out = make_output(tmp_path / "o.zarr", arr.shape, (16, 4, 4), dtype="uint8")
    write(denoise(arr, AffineModel(2, 1), dims="tyx", patch=(16, 4, 4)), out)
    np.testing.assert_array_equal(out[...], np.clip(np.rint(2 * arr + 1), 0, 255))


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import dask.array as da
    import zarr
    from srdvol.dask import writer
    from srdvol.dask.graph import denoise, write
    from srdvol.predict.predictors import AffineModel

    writer.LEDGER_INTERVAL = 0  # every block recorded at once
    src, dst, ledger, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    out = zarr.open_array(dst, mode="r+")
    lazy = denoise(da.from_zarr(zarr.open_array(src, mode="r")), AffineModel(2, 1, delay=delay),
                   dims="tyx", patch=(16, 8, 8), chunks=out.chunks, block=(16, 8, 8))
    report = write(lazy, out, ledger=ledger, run_id="run-1", wave=1)
    print(report.computed, report.skipped)
    """
)


def recorded_blocks(path):
    """Finished blocks in a ledger file, read through Ledger with the file's own fingerprint."""
    stored = json.loads(path.read_text())
    return Ledger(path, nblocks=stored["grid"], fingerprint=stored["fingerprint"]).count


def test_resume_after_sigkill(tmp_path):
    arr = noisy((32, 24, 24), seed=3)
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), data=arr, chunks=(16, 8, 8))
    dst = tmp_path / "out.zarr"
    make_output(dst, arr.shape, (16, 8, 8))
    ledger = tmp_path / "ledger.json"
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    total = 2 * 3 * 3
    proc = subprocess.Popen(
        [sys.executable, str(script), str(src), str(dst), str(ledger), "0.3"], env=env
    )
    try:
        deadline = time.monotonic() + 200
        done = 0
        while done < 4:
            assert time.monotonic() < deadline, "the writer never recorded 4 blocks"
            assert proc.poll() is None, "the writer finished before it was killed"
            time.sleep(0.1)
            if ledger.exists():
                done = recorded_blocks(ledger)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    recorded = recorded_blocks(ledger)
    assert 4 <= recorded < total
    # Rerun to the end (fast model: same values) and count what it computed.
    rerun = subprocess.run(
        [sys.executable, str(script), str(src), str(dst), str(ledger), "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    computed, skipped = map(int, rerun.stdout.split())
    assert (computed, skipped) == (total - recorded, recorded)
    # Identical to an uninterrupted run.
    fresh = make_output(tmp_path / "fresh.zarr", arr.shape, (16, 8, 8))
    write(
        denoise(
            arr,
            AffineModel(2, 1),
            dims="tyx",
            patch=(16, 8, 8),
            chunks=(16, 8, 8),
            block=(16, 8, 8),
        ),
        fresh,
    )
    np.testing.assert_array_equal(zarr.open_array(str(dst))[...], fresh[...])
    np.testing.assert_allclose(fresh[...], 2 * arr + 1, rtol=2e-6)


# --- distributed ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


class _WritesInFlight(SchedulerPlugin):
    """Scheduler plugin: blocks in flight as the scheduler sees them, counted at every
    transition (not sampled from a callback). A block is in flight from the moment its store
    task reaches the scheduler until that task has finished (memory), failed or was dropped."""

    name = "srdvol-test-writes-in-flight"
    OPEN = frozenset({"waiting", "queued", "processing", "no-worker"})

    def __init__(self) -> None:
        super().__init__()
        self.live: set[str] = set()
        self.seen: set[str] = set()
        self.peak = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        text = str(key)
        if not text.startswith("srdvol-write-"):
            return
        if finish in self.OPEN:
            self.live.add(text)
            self.seen.add(text)
        else:  # memory, erred, released, forgotten
            self.live.discard(text)
        self.peak = max(self.peak, len(self.live))


@pytest.mark.slow
def test_writer_on_local_cluster(tmp_path, client):
    arr = noisy((32, 2, 16, 24), seed=4)
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), data=arr, chunks=(16, 1, 8, 8))
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 1, 8, 8))
    lazy = denoise(
        da.from_zarr(zarr.open_array(str(src), mode="r")),
        PatchMeanModel(),
        dims="tzyx",
        patch=(16, 6, 6),
        chunks=out.chunks,
        block=(16, 8, 8),
    )
    total = int(np.prod(lazy.numblocks))
    scheduler = client.cluster.scheduler
    watch = _WritesInFlight()
    scheduler.add_plugin(watch)
    try:
        report = write(
            lazy, out, client=client, wave=3, ledger=tmp_path / "out.zarr" / "ledger.json"
        )
    finally:
        scheduler.remove_plugin(name=watch.name)
    assert total == 24 and report.computed == total
    # The scheduler never held more than 3 unfinished blocks, and it did hold 3 (the bound is
    # reached, so a writer that kept fewer in flight, or one more, would show here).
    assert len(watch.seen) == total
    assert watch.peak == 3, watch.peak
    assert report.max_in_flight <= 3
    ref = predict_array(arr, PatchMeanModel(), patch=(16, 6, 6), overlap=0.25, dims="tzyx")
    np.testing.assert_allclose(out[...], ref, rtol=1e-5)
    again = write(lazy, out, client=client, ledger=tmp_path / "out.zarr" / "ledger.json")
    assert (again.computed, again.skipped) == (0, total)


class _InFlight(SchedulerPlugin):
    """Scheduler plugin: the most blocks whose model output (``_sums_block``) is being computed
    or held at once, and the most store tasks the scheduler knew at once."""

    name = "srdvol-test-in-flight"

    def __init__(self) -> None:
        super().__init__()
        self.live: set[str] = set()
        self.known: set[str] = set()
        self.peak = self.peak_known = 0

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        text = str(key)
        if "_sums_block" in text:
            if finish in ("processing", "memory"):
                self.live.add(text)
            else:
                self.live.discard(text)
            self.peak = max(self.peak, len(self.live))
        elif text.startswith("srdvol-write-"):
            if finish == "forgotten":
                self.known.discard(text)
            else:
                self.known.add(text)
            self.peak_known = max(self.peak_known, len(self.known))


def _many_blocks(tmp_path):
    arr = noisy((64, 1, 64, 64), seed=5)
    src = tmp_path / "in.zarr"
    zarr.create_array(str(src), data=arr, chunks=(16, 1, 16, 16))
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 1, 16, 16))
    lazy = denoise(
        da.from_zarr(zarr.open_array(str(src), mode="r")),
        AffineModel(2, 1),
        dims="tzyx",
        patch=(16, 8, 8),
        chunks=out.chunks,
        block=(16, 16, 16),
    )
    return arr, out, lazy


@pytest.mark.slow
def test_writer_submits_a_job_that_fits_whole_and_a_big_one_in_bounded_waves(
    tmp_path, client, monkeypatch
):
    """Without ``wave`` a job that fits in a quarter of the workers' memory is submitted at once
    (the dashboard's totals are the whole job); a bigger one goes in waves of 2 x threads, so
    what waits in memory stays bounded whatever the job's size."""
    from srdvol.dask import writer as engine

    arr, out, lazy = _many_blocks(tmp_path)
    total = int(np.prod(lazy.numblocks))
    scheduler = client.cluster.scheduler
    threads = sum(w.nthreads for w in scheduler.workers.values())
    watch = _InFlight()
    scheduler.add_plugin(watch)
    try:
        whole = write(lazy, out, client=client)
    finally:
        scheduler.remove_plugin(name=watch.name)
    assert total == 64 and whole.computed == total
    assert whole.max_in_flight == total  # all submitted up front
    assert watch.peak_known == total  # so the scheduler (and its dashboard) saw the whole job
    assert watch.peak < total  # and only some of them ran or waited in memory at once
    np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)

    monkeypatch.setattr(engine, "UPFRONT_MEMORY_FRACTION", 1e-12)  # as if the job were huge
    watch = _InFlight()
    scheduler.add_plugin(watch)
    try:
        waves = write(
            lazy, make_output(tmp_path / "o2.zarr", arr.shape, (16, 1, 16, 16)), client=client
        )
    finally:
        scheduler.remove_plugin(name=watch.name)
    assert waves.computed == total
    assert waves.max_in_flight <= 2 * threads
    assert watch.peak <= 2 * threads  # blocks computing or held
    # the scheduler forgets a written block a moment after the client moves on
    assert watch.peak_known <= 3 * threads


@pytest.mark.slow
def test_a_block_whose_workers_keep_dying_is_one_clear_sentence(tmp_path):
    """distributed retries a block whose worker died; when it stops retrying (here at once),
    the writer names the block and the fix instead of a KilledWorker traceback."""
    import dask
    import distributed

    from srdvol.errors import ClusterError

    arr = noisy((32, 8, 8))
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 8, 8))
    lazy = denoise(arr, AffineModel(delay=30), dims="tyx", patch=(16, 8, 8), chunks=(16, 8, 8))
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        c.wait_for_workers(1, timeout=60)
        pid = next(iter(c.run(os.getpid).values()))

        def kill_when_running() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(ws.processing for ws in cluster.scheduler.workers.values()):
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_running, daemon=True)
        killer.start()
        with pytest.raises(ClusterError) as info:
            write(lazy, out, client=c)
        killer.join()
    message = str(info.value)
    assert message.startswith("block ") and "died again and again" in message
    assert "smaller block" in message and "rerun the same command" in message
    assert "smaller --block" in info.value.command_line_message()


@pytest.mark.slow
def test_nan_block_error_travels_back_from_worker(tmp_path, client):
    arr = noisy((16, 8, 16))
    arr[2, 1, 12] = np.inf
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 8, 8))
    lazy = denoise(
        da.from_array(arr, chunks=(16, 8, 8)),
        AffineModel(),
        dims="tyx",
        patch=(16, 4, 4),
        chunks=out.chunks,
        block=(16, 8, 8),
    )
    with pytest.raises(BlockDataError, match=r"block \(0, 0, 1\) \(t=0:16, y=0:8, x=8:16\)"):
        write(lazy, out, client=client, ledger=tmp_path / "l.json")


# --- with the real reader and output writer ---------------------------------------------------


def test_open_image_denoise_write_roundtrip(tmp_path, make_image):
    from ome_zarr_models import v05

    from srdvol.ngff.read import open_image
    from srdvol.ngff.write import create_output

    path, data = make_image(
        axes="tzyx", shape=(20, 2, 24, 20), dtype="uint16", chunks=(4, 1, 8, 10)
    )
    image = open_image(path)
    out_path = tmp_path / "out.zarr"
    out = create_output(
        out_path, like=image, provenance={"patch": [16, 8, 8]}, chunks={"t": 4, "y": 8, "x": 10}
    )
    lazy = denoise(image, AffineModel(2, 1), patch=(16, 8, 8), chunks=out.chunks)
    assert lazy.dims == image.dims
    report = write(lazy, out, ledger=out_path / "srdvol_ledger.json", run_id="r1")
    assert report.computed == int(np.prod(lazy.data.numblocks))
    np.testing.assert_allclose(out[...], 2 * data.astype(np.float32) + 1, rtol=2e-6)
    v05.Image.from_zarr(zarr.open_group(str(out_path), mode="r"))  # ledger file is harmless
    np.testing.assert_allclose(open_image(out_path).values, out[...])


# --- each patch once, each input voxel once, I/O beside the model -----------------------------

_READS: dict[int, list[tuple[float, float, int]]] = {}
_PATCHES: dict[int, list[tuple[int, ...]]] = {}
_MODEL_CALLS: dict[int, list[tuple[float, float]]] = {}


class CountingArray:
    """A numpy array behind ``__getitem__`` that records every read (interval, voxels) in this
    process, also from copies (a distributed graph is pickled even for in-process workers)."""

    def __init__(self, data: np.ndarray, delay: float = 0.0) -> None:
        self.data, self.delay = data, delay
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.id = id(self)
        _READS[self.id] = []

    def __getitem__(self, index):
        start = time.monotonic()
        if self.delay:
            time.sleep(self.delay)
        out = self.data[index]
        _READS[self.id].append((start, time.monotonic(), int(out.size)))
        return out

    @property
    def voxels(self) -> int:
        return sum(n for _, _, n in _READS[self.id])


class RecordingIdentity:
    """The identity model, recording the start of every patch (decoded from the input, whose
    values are flat indices) and the interval of every call."""

    def __init__(self, shape: tuple[int, ...], delay: float = 0.0) -> None:
        self.shape, self.delay = shape, delay
        self.id = uuid_int()
        _PATCHES[self.id], _MODEL_CALLS[self.id] = [], []

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        start = time.monotonic()
        if self.delay:
            time.sleep(self.delay)
        for p in patches:
            _PATCHES[self.id].append(np.unravel_index(int(p[0, 0, 0]), self.shape))
        _MODEL_CALLS[self.id].append((start, time.monotonic()))
        return patches


def uuid_int() -> int:
    import uuid

    return uuid.uuid4().int


def _positions(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # exact below 2**24


def _lattice_starts(shape, dims, patch, overlap):
    from srdvol.core.tiling import lattice, stride

    per_axis = []
    for a, n in zip(dims, shape, strict=True):
        if a in "tyx":
            p = patch["tyx".index(a)]
            per_axis.append([int(s) for s in lattice(n, p, stride(p, overlap))])
        else:
            per_axis.append(list(range(n)))
    return sorted(itertools.product(*per_axis))


@st.composite
def grids(draw):
    dims = draw(st.sampled_from(["tyx", "tzyx"]))
    sizes = {"t": draw(st.integers(16, 48)), "z": 2, "y": draw(st.integers(4, 20))}
    sizes["x"] = draw(st.integers(4, 20))
    shape = tuple(sizes[a] for a in dims)
    patch = (draw(st.integers(4, 16)), draw(st.integers(2, 8)), draw(st.integers(2, 8)))
    block = {a: draw(st.integers(1, 16)) for a in "tyx"}
    out_chunks = tuple(1 if a == "z" else draw(st.integers(1, 8)) for a in dims)
    in_chunks = tuple(1 if a == "z" else draw(st.integers(1, 24)) for a in dims)
    return {
        "dims": dims,
        "shape": shape,
        "patch": patch,
        "overlap": draw(st.sampled_from([0.0, 0.25, 0.5])),
        "block": tuple(block[a] for a in "tyx"),
        "out_chunks": out_chunks,
        "in_chunks": in_chunks,
        "wave": draw(st.integers(1, 4)),
        "threads": draw(st.integers(1, 2)),
    }


def _run_once(case, tmp, *, client=None, read_delay=0.0, model_delay=0.0, then=None):
    """Denoise and write ``case`` with the recording identity; ``then(image, lazy, chunks)``
    may stack a step on the lazy denoised array before it is written."""
    data = _positions(case["shape"])
    source = CountingArray(data, delay=read_delay)
    model = RecordingIdentity(case["shape"], delay=model_delay)
    model.batch_size = 3
    out = zarr.create_array(
        str(tmp / f"o{model.id}.zarr"),
        shape=data.shape,
        chunks=case["out_chunks"],
        dtype="float32",
        fill_value=np.nan,
    )
    image = da.from_array(source, chunks=case["in_chunks"])
    lazy = denoise(
        image,
        model,
        dims=case["dims"],
        patch=case["patch"],
        overlap=case["overlap"],
        chunks=out.chunks,
        block=case["block"],
    )
    if then is not None:
        lazy = then(image, lazy, out.chunks)
    report = write(lazy, out, client=client, wave=case["wave"], threads=case["threads"])
    return data, source, model, out, lazy, report


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=grids())
def test_each_patch_is_predicted_once_and_each_input_voxel_read_once(case, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("once")
    data, source, model, out, lazy, report = _run_once(case, tmp)
    assert report.computed == int(np.prod(lazy.numblocks))
    starts = sorted(tuple(int(i) for i in s) for s in _PATCHES[model.id])
    assert starts == _lattice_starts(case["shape"], case["dims"], case["patch"], case["overlap"])
    assert source.voxels == data.size  # every input voxel read once, halos included
    np.testing.assert_array_equal(out[...], data)  # the identity comes back exactly


@pytest.fixture(scope="module")
def threads_client():
    """One in-process worker with one thread: counters in this process see its reads."""
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.slow
def test_each_patch_once_and_each_voxel_read_once_on_a_cluster(tmp_path, threads_client):
    case = {
        "dims": "tzyx",
        "shape": (40, 2, 18, 14),
        "patch": (8, 6, 4),
        "overlap": 0.25,
        "block": (8, 6, 6),
        "out_chunks": (4, 1, 3, 6),
        "in_chunks": (5, 1, 7, 4),
        "wave": 3,
        "threads": 1,
    }
    data, source, model, out, lazy, _ = _run_once(case, tmp_path, client=threads_client)
    assert lazy.numblocks == (5, 2, 3, 2)  # x: 6 + 8 (a tail of 2 < halo 3 is merged)
    starts = sorted(tuple(int(i) for i in s) for s in _PATCHES[model.id])
    assert starts == _lattice_starts(case["shape"], "tzyx", case["patch"], 0.25)
    assert source.voxels == data.size
    np.testing.assert_array_equal(out[...], data)


def _overlapping(reads, calls):
    return [r for r in reads for c in calls if r[0] < c[1] and c[0] < r[1]]


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_the_next_block_is_read_while_the_model_runs(tmp_path, request, where):
    # 6 blocks along t; each read takes 0.1 s and each model call 0.3 s. The reads of the next
    # block happen during the forward passes of this one, on the same (single-threaded) worker.
    client = request.getfixturevalue("threads_client") if where == "cluster" else None
    case = {
        "dims": "tyx",
        "shape": (96, 8, 8),
        "patch": (16, 8, 8),
        "overlap": 0.0,
        "block": (16, 8, 8),
        "out_chunks": (16, 8, 8),
        "in_chunks": (16, 8, 8),
        "wave": 2,
        "threads": 1,
    }
    started = time.monotonic()
    _, source, model, _, _, report = _run_once(
        case, tmp_path, client=client, read_delay=0.1, model_delay=0.3
    )
    elapsed = time.monotonic() - started
    reads = [r for r in _READS[source.id] if r[2]]
    calls = _MODEL_CALLS[model.id]
    assert report.computed == 6 and len(calls) == 6 and len(reads) == 6
    hidden = _overlapping(reads, calls)
    assert len(hidden) >= 3, (reads, calls)  # most reads ran beside a forward pass
    # one model at a time: the forward passes never overlap each other
    assert not any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(calls, 2))
    assert elapsed < 6 * (0.1 + 0.3) + 5  # and the overlap shows in the time (loose: CI load)


def test_what_waits_for_later_blocks_does_not_grow_with_the_movie(tmp_path, monkeypatch):
    """The writer keeps results for later neighbours (halos, spills): one layer of the grid,
    whatever the number of blocks along t."""
    from srdvol.dask import runners

    peaks = {}

    class Watching(runners.LocalRunner):
        def submit(self, graph, want, priority):
            handles = super().submit(graph, want, priority)
            peaks[frames] = max(peaks.get(frames, 0), self.held)
            return handles

    monkeypatch.setattr(runners, "LocalRunner", Watching)
    from srdvol.dask import writer

    monkeypatch.setattr(writer, "LocalRunner", Watching)
    for frames in (64, 256):
        arr = noisy((frames, 24, 24), seed=frames)
        out = make_output(tmp_path / f"o{frames}.zarr", arr.shape, (16, 8, 8))
        lazy = denoise(
            da.from_array(arr, chunks=(16, 8, 8)),
            AffineModel(2, 1),
            dims="tyx",
            patch=(16, 8, 8),
            chunks=(16, 8, 8),
            block=(16, 8, 8),
        )
        write(lazy, out, wave=2)
        np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)
    # 4 times the blocks along t; what is held depends a little on timing, not on the length
    assert 9 <= peaks[64] and peaks[256] < 1.5 * peaks[64]


def test_planes_of_a_zarr_input_are_independent_and_go_one_after_another(tmp_path):
    """from_zarr gives every block one shared task (the array handle): it must not couple the
    z planes, or the writer would hold a whole layer of planes for later neighbours."""
    from srdvol.dask.units import BlockUnits

    arr = noisy((64, 3, 16, 16), seed=3)
    src = zarr.create_array(str(tmp_path / "in.zarr"), data=arr, chunks=(8, 1, 16, 16))
    lazy = denoise(
        da.from_zarr(src),
        AffineModel(2, 1),
        dims="tzyx",
        patch=(16, 8, 8),
        chunks=(16, 1, 16, 16),
        block=(16, 16, 16),
    )
    units = BlockUnits(lazy, eager_prefix=writer.EAGER_PREFIX)
    assert units.grid[:2] == (4, 3) and units.coupled == [0]  # t only; y and x are one block
    planes = [units.index(flat)[1] for flat in units.order(range(12))]
    assert planes == [0] * 4 + [1] * 4 + [2] * 4
    out = make_output(tmp_path / "out.zarr", arr.shape, (16, 1, 16, 16))
    write(lazy, out, wave=2)
    np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)


def test_a_spill_is_a_copy_that_lets_the_block_sums_go():
    """A block's spill past its t edge is a slice along the first axis: a view would keep the
    whole float64 sums of the block alive until its neighbour had run."""
    from srdvol.dask.graph import _cut

    sums = np.arange(6 * 4 * 4, dtype=np.float64).reshape(6, 4, 4)
    spill = _cut(sums, (slice(4, None), slice(None), slice(None)))
    assert spill.base is None and not np.shares_memory(spill, sums)
    np.testing.assert_array_equal(spill, sums[4:])


def test_rechunking_is_plain_tasks_even_where_dask_would_pick_p2p(tmp_path):
    """With a distributed Client as the default, dask picks its P2P rechunk for all-to-all
    rechunks; its barrier cannot run block by block (nor in this process)."""
    import dask

    arr = noisy((16, 4, 6), seed=5)
    out = make_output(tmp_path / "out.zarr", arr.shape, (1, 2, 1))
    with dask.config.set({"array.rechunk.method": "p2p"}):
        lazy = denoise(
            da.from_array(arr, chunks=(1, 1, 6)),
            AffineModel(2, 1),
            dims="tyx",
            patch=(4, 2, 2),
            overlap=0.0,
            chunks=(1, 2, 1),
            block=(1, 3, 1),
        )
    assert not any("p2p" in str(name) for name in lazy.__dask_graph__().layers)
    write(lazy, out, wave=1)
    np.testing.assert_allclose(out[...], 2 * arr + 1, rtol=2e-6)


@pytest.mark.slow
def test_restore_keeps_each_patch_once(tmp_path):
    """``--restore`` stacks its stretches on the denoised blocks: the network still predicts
    each lattice patch once, each input voxel is read once, and what is written is the
    restore of the network's output."""
    from srdvol.dask.restoring import restored
    from srdvol.predict.restore import restore

    case = {
        "dims": "tyx",
        "shape": (40, 80, 72),
        "patch": (8, 8, 8),
        "overlap": 0.25,
        "block": (16, 24, 24),
        "out_chunks": (8, 8, 8),
        "in_chunks": (20, 40, 36),
        "wave": 2,
        "threads": 2,
    }

    def restore_step(image, lazy, chunks):
        return restored(image, lazy, dims="tyx", scale=1000.0, chunks=chunks)

    data, source, model, out, _, _ = _run_once(case, tmp_path, then=restore_step)
    starts = sorted(tuple(int(i) for i in s) for s in _PATCHES[model.id])
    assert starts == _lattice_starts(case["shape"], "tyx", case["patch"], 0.25)
    assert source.voxels == data.size  # the restore's input is the network's, read once
    np.testing.assert_allclose(out[...], restore(data, data, scale=1000.0), rtol=1e-5, atol=0.5)
