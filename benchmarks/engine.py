"""Engine benchmark: what a terabyte costs, and how close the engine runs to plain Zarr I/O.

Four sections, each a markdown table on stdout (``--sections`` picks them):

``plan``
    The default block plan at the TB geometry of issue 10 ((4000, 32, 2048, 2048) uint16, patch
    (64, 128, 128), chunks (16, 1, 512, 512)) for a worker of this machine and for a GPU node's
    worker, with its exact cost (:func:`srdvol.core.cost.plan_cost`), beside the old engine's.
``scaled``
    That geometry at 1/8 of every length, blocks scaled likewise, run by this engine and by the
    old one (``--old``: a checkout of main at 16014a4) in turn in one run: model voxels per
    output voxel counted at the predictor, input voxels read counted at the array, seconds.
``identity``
    Two real sizes with srdvol's default patch, output chunks and blocks (sized to the
    benchmark cluster's workers): a plain Zarr copy (read, decompress, float32, compress, write)
    and the identity-model engine on the same cluster, side by side; tasks, peak RSS of the
    whole process tree; the first size also at 8x its frames.
``model``
    A real default-width network on this CPU at the TB geometry scaled to 1/4 of every length,
    default blocks of each engine: the same output region (the first ``--frames`` frames of the
    first plane) computed by the old engine and by this one, in turn; output voxels per second
    and the largest difference between their outputs.

Run: ``python benchmarks/engine.py --old /tmp/srdvol-old`` (``git archive 16014a4 | tar -x -C
/tmp/srdvol-old``); ``--help`` for the options. Old-engine runs happen in a subprocess with
``PYTHONPATH`` set to the checkout, so both engines read the same input in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TB = {"shape": (4000, 32, 2048, 2048), "patch": (64, 128, 128), "chunks": (16, 1, 512, 512)}
#: The old engine's default block budget (512 MiB per block's buffers).
OLD_MEMORY = 512 * 2**20
#: A GPU node's worker: 8 GPUs of 80 GB sharing 2 TiB of host memory.
GPU_WORKER = {"host": 2 * 2**40 // 8, "device": 80 * 10**9}


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

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


def make_input(
    path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], *, frames: int | None = None
) -> Any:
    """Poisson-like uint16 data written slab by slab of chunks along t (only the first
    ``frames`` frames of the first plane when given: a run that reads no more)."""
    import zarr

    arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint16")
    rng = np.random.default_rng(0)
    planes = slice(None) if frames is None else slice(0, 1)
    for t0 in range(0, shape[0] if frames is None else min(frames, shape[0]), chunks[0]):
        n = min(chunks[0], shape[0] - t0)
        size = (n, len(range(shape[1])[planes]), *shape[2:])
        arr[t0 : t0 + n, planes] = rng.poisson(200, size=size).astype(np.uint16)
    return arr


def scale(values: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(max(1, v // factor) for v in values)


# ---------------------------------------------------------------------------------------------
# A measurement that either engine runs (in a subprocess for the old one)


class CountingArray:
    """An array behind ``__getitem__`` that counts the voxels read (in this process)."""

    voxels = 0

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.shape, self.dtype, self.ndim = inner.shape, inner.dtype, inner.ndim

    def __getitem__(self, index: Any) -> np.ndarray:
        out = np.asarray(self.inner[index])
        CountingArray.voxels += out.size
        return out


class Counting:
    """A predictor that counts the patch voxels it predicts (forwarding attributes)."""

    voxels = 0

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        if hasattr(inner, "predict_tensor"):
            self.predict_tensor = self._predict_tensor

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        Counting.voxels += patches.size
        return self.inner(patches)

    def _predict_tensor(self, patches: Any) -> Any:
        Counting.voxels += patches.numel()
        return self.inner.predict_tensor(patches)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``denoise`` + ``write`` of whichever srdvol is importable; count and time it."""
    import dask.array as da
    import torch
    import zarr

    from srdvol.dask.graph import Ledger, denoise, write
    from srdvol.predict.predictors import AffineModel, ModelPredictor

    torch.set_num_threads(job.get("torch_threads", 2))
    src = zarr.open_array(job["input"], mode="r")
    inner = AffineModel() if job["model"] == "identity" else ModelPredictor(job["model"])
    model = Counting(inner)
    out = zarr.create_array(
        job["output"], shape=src.shape, chunks=job["out_chunks"], dtype="float32", overwrite=True
    )
    lazy = denoise(
        da.from_array(CountingArray(src), chunks=src.chunks),
        model,
        dims="tzyx",
        patch=job["patch"],
        overlap=0.25,
        chunks=job["out_chunks"],
        block=job["block"],
    )
    ledger = None
    if job.get("only") is not None:
        # Compute a subset of the blocks: mark all others as done in a ledger first.
        only = [tuple(i) for i in job["only"]]
        ledger = str(Path(job["output"]).with_suffix(".ledger.json"))
        book = Ledger(
            ledger,
            nblocks=lazy.numblocks,
            fingerprint={
                "shape": list(lazy.shape),
                "chunks": [list(c) for c in lazy.chunks],
                "run_id": "",
            },
            interval=0,
        )
        for flat in range(math.prod(lazy.numblocks)):
            if tuple(int(i) for i in np.unravel_index(flat, lazy.numblocks)) not in only:
                book.mark(flat)
        book.flush()
    started = time.perf_counter()
    report = write(lazy, out, ledger=ledger, threads=job.get("threads", 1))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "blocks": report.computed,
        "voxels": report.voxels,
        "patch_voxels": Counting.voxels,
        "read_voxels": CountingArray.voxels,
        "numblocks": list(lazy.numblocks),
    }


def old_plan(shape: tuple[int, ...], patch: tuple[int, ...], chunks: tuple[int, ...]) -> dict:
    """The old engine's default plan and cost (run where the old srdvol is importable)."""
    from srdvol.core.tiling import plan_blocks

    try:
        from srdvol.core.cost import plan_cost
    except ImportError:  # srdvol before the cost moved out of tiling
        from srdvol.core.tiling import plan_cost

    plan = plan_blocks(
        shape,
        dims="tzyx",
        patch=dict(zip("tyx", patch, strict=True)),
        overlap=0.25,
        chunks=chunks,
        memory=OLD_MEMORY,
    )
    cost = plan_cost(plan)
    return {
        "block": list(plan.block_shape),
        "blocks": cost.blocks,
        "lattice": cost.lattice_ratio,
        "computed": cost.computed_ratio,
        "read": cost.read_ratio,
    }


def in_child(old: str | None, call: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``call`` (measure or old_plan) in a fresh interpreter, with the old srdvol if given."""
    env = dict(os.environ)
    if old:
        env["PYTHONPATH"] = old
    cmd = [sys.executable, __file__, "--child", call, json.dumps(payload)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"{call} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Sections


def new_plan(
    shape: tuple[int, ...], patch: tuple[int, ...], chunks: tuple[int, ...], budget: Any
) -> Any:
    from srdvol.core.tiling import BlockMemory, plan_blocks

    return plan_blocks(
        shape,
        dims="tzyx",
        patch=dict(zip("tyx", patch, strict=True)),
        overlap=0.25,
        chunks=chunks,
        memory=BlockMemory(budget.host, budget.device),
        itemsize=2,
    )


def section_plan(args: argparse.Namespace) -> None:
    from srdvol.core.cost import plan_cost
    from srdvol.dask.budget import DEVICE_FRACTION, HOST_FRACTION, Budget, local_budget

    here = local_budget()
    gpu = Budget(
        host=int(GPU_WORKER["host"] * HOST_FRACTION),
        device=int(GPU_WORKER["device"] * DEVICE_FRACTION),
        worker_host=GPU_WORKER["host"],
    )
    print("\n### Default plan at the TB geometry", TB, "\n")
    print(
        "| engine, worker | block (t, z, y, x) | blocks | model voxels per output voxel "
        "(x whole pass) | bytes read per input byte | block region / core |"
    )
    print("|---|---|---|---|---|---|")
    if args.old:
        old = in_child(args.old, "old_plan", TB)
        print(
            f"| old, 512 MiB per block | {tuple(old['block'])} | {old['blocks']:,} | "
            f"{old['computed']:.2f} ({old['computed'] / old['lattice']:.2f}) | "
            f"{old['read']:.2f} | {old['read']:.2f} |"
        )
    for label, budget in (("this machine (1 CPU worker)", here), ("GPU node worker", gpu)):
        plan = new_plan(TB["shape"], TB["patch"], TB["chunks"], budget)
        cost = plan_cost(plan)
        print(
            f"| new, {label}: {budget.worker_host / 2**30:.0f} GiB host"
            f"{f', {budget.device / DEVICE_FRACTION / 1e9:.0f} GB GPU' if budget.device else ''}"
            f" | {plan.block_shape} | {cost.blocks:,} | {cost.computed_ratio:.2f} "
            f"({cost.computed_ratio / cost.lattice_ratio:.2f}) | {cost.read_ratio:.2f} | "
            f"{cost.region_ratio:.2f} |"
        )


def section_scaled(args: argparse.Namespace) -> None:
    from srdvol.core.tiling import lattice, stride
    from srdvol.dask.budget import local_budget

    factor = 8
    shape, patch, chunks = (scale(TB[k], factor) for k in ("shape", "patch", "chunks"))
    shape = (shape[0], 4, shape[2], shape[3])  # 32 planes / 8
    plan = new_plan(TB["shape"], TB["patch"], TB["chunks"], local_budget())
    runs = [("new", None, scale(plan.block_shape, factor))]
    if args.old:
        old = in_child(args.old, "old_plan", TB)
        runs.insert(0, ("old", args.old, scale(tuple(old["block"]), factor)))
    lattice_voxels = (
        math.prod(
            len(lattice(n, p, stride(p, 0.25))) * p
            for n, p in zip((shape[0], shape[2], shape[3]), patch, strict=True)
        )
        * shape[1]
    )
    tmp = Path(tempfile.mkdtemp(prefix="srdvol-bench-", dir=args.tmp))
    rows = []
    try:
        src = make_input(tmp / "in.zarr", shape, chunks)
        for name, path, block in runs:
            result = in_child(
                path,
                "measure",
                {
                    "input": str(tmp / "in.zarr"),
                    "output": str(tmp / f"{name}.zarr"),
                    "out_chunks": chunks,
                    "patch": patch,
                    "block": [block[0], block[2], block[3]],
                    "model": "identity",
                },
            )
            rows.append(
                f"| {name} | {block} | {math.prod(result['numblocks']):,} | "
                f"{result['patch_voxels'] / src.size:.2f} | "
                f"{result['patch_voxels'] / lattice_voxels:.2f} | "
                f"{result['read_voxels'] / src.size:.2f} | {result['seconds']:.1f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n### TB geometry at 1/8: {shape} uint16, patch {patch}, chunks {chunks}\n")
    print(
        "| engine | block | blocks | model voxels per output voxel | x one whole-array pass | "
        "input voxels read per input voxel | seconds (identity, 1 thread) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def worker_cpu(client: Any) -> float:
    """CPU seconds the worker processes have used so far."""

    def cpu() -> float:
        import psutil

        times = psutil.Process().cpu_times()
        return times.user + times.system

    return sum(client.run(cpu).values())


def run_copy(src: Any, dst_path: Path, client: Any, chunks: tuple[int, ...]) -> dict[str, Any]:
    import dask.array as da
    import zarr

    dst = zarr.create_array(str(dst_path), shape=src.shape, chunks=chunks, dtype="float32")
    lazy = da.from_zarr(src).astype(np.float32).rechunk(chunks)
    stored = da.store(lazy, dst, lock=False, compute=False)
    tasks = len(dict(stored.__dask_graph__()))
    cpu = worker_cpu(client)
    with PeakRSS() as rss:
        start = time.perf_counter()
        client.compute(stored).result()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tasks": tasks, "peak": rss.peak, "cpu": worker_cpu(client) - cpu}


def sized_block(plan: Any) -> dict[str, int]:
    """The plan's (t, y, x) block, sized to the cluster's workers (denoise sizes it locally)."""
    return {a: n for a, n in zip(plan.dims, plan.block_shape, strict=True) if a in "tyx"}


def run_engine(src: Any, dst_path: Path, client: Any, chunks: tuple[int, ...]) -> dict[str, Any]:
    import dask.array as da
    import zarr

    from srdvol.dask.budget import cluster_budget
    from srdvol.dask.graph import denoise, write
    from srdvol.options import DEFAULT_TRAIN_PATCH as DEFAULT_PATCH
    from srdvol.predict.predictors import AffineModel

    dst = zarr.create_array(str(dst_path), shape=src.shape, chunks=chunks, dtype="float32")
    lazy = denoise(
        da.from_zarr(src),
        AffineModel(),
        dims="tzyx",
        patch=DEFAULT_PATCH,
        overlap=0.25,
        chunks=chunks,
        block=sized_block(new_plan(src.shape, DEFAULT_PATCH, chunks, cluster_budget(client))),
    )
    tasks = len(dict(lazy.__dask_graph__())) + math.prod(lazy.numblocks)  # + one store per block
    cpu = worker_cpu(client)
    with PeakRSS() as rss:
        start = time.perf_counter()
        report = write(lazy, dst, client=client, ledger=dst_path / "ledger.json")
        seconds = time.perf_counter() - start
    cpu = worker_cpu(client) - cpu
    sample = (slice(0, 8), 0, slice(0, 64), slice(0, 64))
    if not np.array_equal(dst[sample], src[sample].astype(np.float32)):
        raise RuntimeError("the identity model did not reproduce the input")
    return {
        "seconds": seconds,
        "tasks": tasks,
        "peak": rss.peak,
        "cpu": cpu,
        "blocks": report.computed,
        "block": lazy.chunksize,
    }


def section_identity(args: argparse.Namespace) -> None:
    import statistics

    from srdvol.dask.cluster import open_cluster
    from srdvol.ngff.write import output_chunks

    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    sizes.insert(1, (sizes[0][0] * 8, *sizes[0][1:]))  # the first size at 8x its frames
    rows = []
    if args.cluster == "default":  # what `srdvol predict` starts on this machine
        options: dict[str, Any] = {}
        layout = "srdvol's default local cluster"
    else:
        options = {
            "workers": args.workers,
            "threads_per_worker": 1,
            "memory_limit": args.worker_memory,
        }
        layout = (
            f"srdvol's local cluster of {args.workers} CPU workers x 1 torch thread, "
            f"memory_limit {args.worker_memory} each"
        )
    with open_cluster(gpus="none", dashboard_address=None, **options) as c:
        from srdvol.dask.workers import live_workers

        workers = live_workers(c).values()
        layout += (
            f" ({len(workers)} worker(s), "
            f"{sum(w['memory_limit'] for w in workers) / 2**30:.1f} GiB in all)"
        )
        for shape in sizes:
            chunks = tuple(output_chunks(dict(zip("tzyx", shape, strict=True))).values())
            tmp = Path(tempfile.mkdtemp(prefix="srdvol-bench-", dir=args.tmp))
            try:
                src = make_input(tmp / "in.zarr", shape, chunks)
                if not rows:  # first tasks pay for imports in the workers
                    run_copy(src, tmp / "warm.zarr", c, chunks)
                runs: dict[str, list[dict[str, Any]]] = {"copy": [], "engine": []}
                for i in range(args.repeat):  # alternate: load from other jobs hits both
                    runs["copy"].append(run_copy(src, tmp / f"copy{i}.zarr", c, chunks))
                    runs["engine"].append(run_engine(src, tmp / f"out{i}.zarr", c, chunks))
                    shutil.rmtree(tmp / f"copy{i}.zarr")
                    shutil.rmtree(tmp / f"out{i}.zarr")
                gib = src.nbytes / 2**30
                best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
                median = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
                cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in runs.items()}
                for key, label in (("copy", "plain Zarr copy"), ("engine", "engine, identity")):
                    r = runs[key][0]
                    rows.append(
                        f"| {shape} ({gib:.2f} GiB) | {label} | {r.get('block', '')} | "
                        f"{best[key]:.1f} / {median[key]:.1f} | {src.nbytes / 1e6 / best[key]:.0f}"
                        f" | {cpu[key]:.0f} | {r['tasks']:,} | "
                        f"{max(x['peak'] for x in runs[key]) / 2**20:,.0f} |"
                    )
                rows.append(
                    f"| | engine / copy rate | | {best['copy'] / best['engine']:.2f} / "
                    f"{median['copy'] / median['engine']:.2f} | | "
                    f"{cpu['copy'] / cpu['engine']:.2f} | | |"
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n### Identity pipeline vs plain Zarr copy: {layout}; default patch, chunks and "
        f"blocks; {args.repeat} runs of each, alternating\n"
    )
    print(
        "| input (uint16) | pipeline | block | seconds, best / median | input MB/s (best) | "
        "worker CPU s (median) | tasks | peak RSS MiB (max) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def section_model(args: argparse.Namespace) -> None:
    import torch

    from srdvol.dask.budget import local_budget
    from srdvol.model.checkpoint import ModelRecord, Normalization, save_model
    from srdvol.model.network import NetworkConfig, build_network

    factor = 4
    shape, patch, chunks = (scale(TB[k], factor) for k in ("shape", "patch", "chunks"))
    shape = (shape[0], 8, shape[2], shape[3])
    new = scale(new_plan(TB["shape"], TB["patch"], TB["chunks"], local_budget()).block_shape, 4)
    runs = [("new", None, new)]
    if args.old:
        old = scale(tuple(in_child(args.old, "old_plan", TB)["block"]), factor)
        runs.insert(0, ("old", args.old, old))
    # The region both engines compute: whole blocks of each, from frame 0, plane 0.
    frames = args.frames
    for _, _, block in runs:
        frames = math.lcm(frames, block[0]) if frames % block[0] else frames
    tmp = Path(tempfile.mkdtemp(prefix="srdvol-bench-", dir=args.tmp))
    rows, outputs = [], {}
    try:
        config = NetworkConfig(patch_t=patch[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = build_network(config).eval()
        model = tmp / "default.safetensors"
        record = ModelRecord(
            network=config,
            patch=patch,
            sampling="spatial",
            normalization=Normalization(mean=200.0, std=14.0),
        )
        save_model(model, network, record)
        make_input(tmp / "in.zarr", shape, chunks, frames=frames + 2 * patch[0])
        for name, path, block in runs:
            only = [
                [t, 0, y, x]
                for t in range(frames // block[0])
                for y in range(math.ceil(shape[2] / block[2]))
                for x in range(math.ceil(shape[3] / block[3]))
            ]
            result = in_child(
                path,
                "measure",
                {
                    "input": str(tmp / "in.zarr"),
                    "output": str(tmp / f"{name}.zarr"),
                    "out_chunks": chunks,
                    "patch": patch,
                    "block": [block[0], block[2], block[3]],
                    "model": str(model),
                    "only": only,
                    "torch_threads": 2,
                },
            )
            outputs[name] = tmp / f"{name}.zarr"
            rows.append((name, block, result))
        import zarr

        region = (slice(0, frames), 0)
        if "old" in outputs:
            a = zarr.open_array(str(outputs["old"]))[region]
            b = zarr.open_array(str(outputs["new"]))[region]
            diff = float(np.abs(a - b).max())
            scale_of = float(np.abs(a).max())
        else:
            diff = scale_of = float("nan")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n### Real default-width network (CPU, 2 torch threads), TB geometry at 1/4: {shape}, "
        f"patch {patch}, chunks {chunks}; output region: frames 0-{frames}, plane 0\n"
    )
    print(
        "| engine | block | blocks run | seconds | output Mvoxel/s | model voxels per output "
        "voxel |"
    )
    print("|---|---|---|---|---|---|")
    rates = {}
    for name, block, r in rows:
        rates[name] = r["voxels"] / r["seconds"]
        print(
            f"| {name} | {block} | {r['blocks']} | {r['seconds']:.1f} | {rates[name] / 1e6:.3f} "
            f"| {r['patch_voxels'] / r['voxels']:.2f} |"
        )
    if "old" in rates:
        print(
            f"\nnew / old output rate: {rates['new'] / rates['old']:.2f}; largest difference "
            f"between the outputs: {diff:.3g} (values up to {scale_of:.0f})"
        )


SECTIONS = {
    "plan": section_plan,
    "scaled": section_scaled,
    "identity": section_identity,
    "model": section_model,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        call, payload = sys.argv[2], json.loads(sys.argv[3])
        func = measure if call == "measure" else lambda p: old_plan(**p)
        print(json.dumps(func(payload)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--old", help="checkout of the old engine (main at 16014a4)")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["512,2,512,512", "256,2,1024,1024"],
        help="real sizes (t,z,y,x) for the identity section; the first also at 8x its frames",
    )
    parser.add_argument(
        "--cluster",
        default="default",
        choices=["default", "small"],
        help="identity: srdvol's default local cluster, or --workers x --worker-memory",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-memory", default="6GiB", help="memory_limit per worker")
    parser.add_argument("--repeat", type=int, default=3, help="identity: runs of each pipeline")
    parser.add_argument("--frames", type=int, default=96, help="model section: frames to run")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores")
    args = parser.parse_args()
    print("load average before:", os.getloadavg())
    for name in args.sections:
        started = time.perf_counter()
        SECTIONS[name](args)
        print(f"\n({name}: {time.perf_counter() - started:.0f} s; load average {os.getloadavg()})")


if __name__ == "__main__":
    main()
