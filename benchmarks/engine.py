"""Engine benchmark: identity-model pipeline versus a plain Zarr copy of the same data.

The plain copy (read, decompress, compress, write; same chunks, same cluster) is the I/O limit the
engine can reach; the identity model (:class:`srdvol.predict.predictors.AffineModel`) measures
the engine's own cost: halo reads, patch gathering, blending and the wave writer. For each
input size it prints seconds, MB/s of input, tasks per GB and peak resident memory of the whole process tree (client,
nannies, workers), as a markdown table.

Run: ``python benchmarks/engine.py`` (``--help`` for sizes and workers).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import zarr

from srdvol.dask.graph import denoise, write
from srdvol.predict.predictors import AffineModel

SIZES = {
    "64 MiB": (64, 2, 512, 512),
    "256 MiB": (128, 2, 1024, 512),
}
CHUNKS = (16, 1, 128, 128)
PATCH = (16, 64, 64)
BLOCK = (32, 256, 256)


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_input(path: Path, shape: tuple[int, ...]) -> zarr.Array:
    """Poisson-like uint16 data written chunk slab by chunk slab."""
    arr = zarr.create_array(str(path), shape=shape, chunks=CHUNKS, dtype="uint16")
    rng = np.random.default_rng(0)
    for t0 in range(0, shape[0], CHUNKS[0]):
        n = min(CHUNKS[0], shape[0] - t0)
        arr[t0 : t0 + n] = rng.poisson(200, size=(n, *shape[1:])).astype(np.uint16)
    return arr


def run_copy(src: zarr.Array, dst_path: Path, client: object) -> dict[str, float]:
    dst = zarr.create_array(str(dst_path), shape=src.shape, chunks=src.chunks, dtype="float32")
    lazy = da.from_zarr(src).astype(np.float32)
    stored = da.store(lazy, dst, lock=False, compute=False)
    tasks = len(dict(stored.__dask_graph__()))
    with PeakRSS() as rss:
        start = time.perf_counter()
        client.compute(stored).result()  # type: ignore[attr-defined]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tasks": tasks, "peak": rss.peak}


def run_engine(
    src: zarr.Array, dst_path: Path, client: object, wave: int | None
) -> dict[str, float]:
    dst = zarr.create_array(str(dst_path), shape=src.shape, chunks=src.chunks, dtype="float32")
    lazy = denoise(
        da.from_zarr(src),
        AffineModel(),
        dims="tzyx",
        patch=PATCH,
        overlap=0.25,
        chunks=dst.chunks,
        block=BLOCK,
    )
    tasks = len(dict(lazy.__dask_graph__())) + math.prod(lazy.numblocks)  # + one store per block
    with PeakRSS() as rss:
        start = time.perf_counter()
        report = write(lazy, dst, client=client, wave=wave or None, ledger=dst_path / "ledger.json")
        seconds = time.perf_counter() - start
    check = dst[0, 0, :64, :64]
    if not np.array_equal(check, src[0, 0, :64, :64].astype(np.float32)):
        raise RuntimeError("identity model did not reproduce the input")
    return {"seconds": seconds, "tasks": tasks, "peak": rss.peak, "blocks": report.computed}


def graph_cost(side: int) -> dict[str, float]:
    """Client time to build one block's write task: culling vs slicing the lazy array."""
    import dask
    from dask.delayed import Delayed

    arr = da.zeros((64, 4, side, side), chunks=(16, 1, 64, 64), dtype=np.uint16)
    lazy = denoise(arr, AffineModel(), dims="tzyx", patch=(16, 32, 32), block=(16, 64, 64))
    graph = lazy.__dask_graph__()
    start = time.perf_counter()
    graph.cull({(lazy.name, 0, 0, 0, 0)})  # first call materialises the layers once
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(20):
        key = (lazy.name, 1, 1, i % lazy.numblocks[2], 3)
        Delayed(key, dict(graph.cull({key})))
    cull = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    for i in range(3):
        dask.delayed(len)(lazy.blocks[1, 1, i, 3])
    sliced = (time.perf_counter() - start) / 3
    return {"blocks": math.prod(lazy.numblocks), "first": first, "cull": cull, "slice": sliced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--wave", type=int, default=4, help="blocks in flight; 0: the writer's default (all)"
    )
    parser.add_argument(
        "--graph-sides",
        type=int,
        nargs="*",
        default=[1024, 4096],
        help="y/x sizes for the graph-cost table (64x64 blocks)",
    )
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as c,
    ):
        warm = Path(tempfile.mkdtemp(prefix="srdvol-bench-"))
        try:  # first tasks pay for imports in the workers; keep that out of the timings
            tiny = make_input(warm / "in.zarr", (32, 1, 256, 256))
            run_copy(tiny, warm / "copy.zarr", c)
            run_engine(tiny, warm / "out.zarr", c, args.wave)
        finally:
            shutil.rmtree(warm, ignore_errors=True)
        for name in args.sizes:
            shape = SIZES[name]
            tmp = Path(tempfile.mkdtemp(prefix="srdvol-bench-"))
            try:
                src = make_input(tmp / "in.zarr", shape)
                gb = src.nbytes / 1e9
                copy = run_copy(src, tmp / "copy.zarr", c)
                eng = run_engine(src, tmp / "out.zarr", c, args.wave)
                for label, r in (("plain Zarr copy", copy), ("engine, identity model", eng)):
                    rows.append(
                        f"| {name} {shape} | {label} | {r['seconds']:.1f} | "
                        f"{src.nbytes / 1e6 / r['seconds']:.1f} | {r['tasks'] / gb:,.0f} | "
                        f"{r['peak'] / 2**20:,.0f} |"
                    )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nworkers: {args.workers} processes x 1 thread, chunks {CHUNKS}, patch {PATCH}, "
        f"overlap 0.25, block {BLOCK}, wave {args.wave or 'default (all blocks up front)'}\n"
    )
    print("| input (uint16) | pipeline | seconds | input MB/s | tasks per GB | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.graph_sides:
        print(
            "\n| blocks | first cull (s, once) | per block: cull (ms) | per block: "
            "`lazy.blocks[i]` (ms) |"
        )
        print("|---|---|---|---|")
        for side in args.graph_sides:
            g = graph_cost(side)
            print(
                f"| {g['blocks']:,} | {g['first']:.1f} | {g['cull'] * 1e3:.1f} | "
                f"{g['slice'] * 1e3:.0f} |"
            )


if __name__ == "__main__":
    main()
