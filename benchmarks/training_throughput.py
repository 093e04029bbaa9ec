"""Distributed training throughput: samples/s of srdvol.dask.ddp_train on 1 and 2 CPU workers.

Run ``python benchmarks/training_throughput.py`` (options: ``--steps``, ``--workers 1 2``,
``--threads``, ``--patch T Y X``, ``--batch``, ``--network small|tiny|default``). It writes a
small synthetic movie to a temporary Zarr store, then for each worker count starts a local CPU
cluster (:func:`srdvol.dask.cluster.open_cluster`) and trains with
:func:`srdvol.dask.ddp_train.train_distributed`. Reported per run:

- samples/s: patches of all ranks per second of the client's wall time between rank 0's reports,
  after the first few steps (warm-up);
- the wall time of the whole call (statistics sample, rendezvous, training, model write).

On a GPU machine pass ``--gpus all`` to use one worker per GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from srdvol.dask.cluster import open_cluster
from srdvol.dask.ddp_train import train_distributed
from srdvol.dask.supervise import StepReport
from srdvol.model.config import NetworkConfig

NETWORKS = {
    "tiny": NetworkConfig.tiny,
    "small": lambda t: NetworkConfig(channels=(4, 4, 8, 8), embed_dim=16, heads=2, patch_t=t),
    "default": lambda t: NetworkConfig(patch_t=t),
}


def make_movie(path: Path, *, shape: tuple[int, int, int], seed: int = 0) -> str:
    """Write a Poisson-noise movie (t, y, x) of uint16 as a plain Zarr array."""
    rng = np.random.default_rng(seed)
    signal = 50 + 30 * np.sin(np.linspace(0, 6, shape[2]))[None, None, :]
    data = rng.poisson(np.broadcast_to(signal, shape)).astype(np.uint16)
    array = zarr.create_array(
        str(path), shape=shape, dtype="uint16", chunks=(16, shape[1], shape[2])
    )
    array[...] = data
    return str(path)


def run(
    source: str,
    workdir: Path,
    *,
    workers: int,
    threads: int,
    steps: int,
    patch: tuple[int, int, int],
    batch: int,
    network: NetworkConfig,
    gpus: str | None,
) -> dict[str, float]:
    """Train once on ``workers`` ranks; return samples/s and wall time."""
    reports: list[tuple[float, StepReport]] = []
    with open_cluster(
        gpus=gpus or "none",
        workers=workers,
        threads_per_worker=threads,
        dashboard_address=None,
    ) as client:
        client.wait_for_workers(workers, timeout=120)
        start = time.perf_counter()
        train_distributed(
            client,
            source,
            workdir / f"model-{workers}.srdvol",
            axes="tyx",
            patch=patch,
            batch_size=batch,
            steps=steps,
            network=network,
            checkpoint_every=steps,
            overwrite=True,
            progress=lambda report: reports.append((time.perf_counter(), report)),
        )
        wall = time.perf_counter() - start
    # Global rate on the client's clock between reports, after 3 warm-up steps.
    warm = min(3, max(0, len(reports) - 2))
    (t0, first), (t1, last) = reports[warm], reports[-1]
    step_s = (t1 - t0) / max(1, last.step - first.step)
    return {
        "workers": workers,
        "samples_per_s": batch * workers / step_s,
        "step_s": step_s,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 64, 64))
    parser.add_argument("--batch", type=int, default=2, help="patches per rank and step")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="small")
    parser.add_argument("--gpus", default=None, help="auto, all or ids; default CPU workers")
    args = parser.parse_args()
    patch = tuple(args.patch)
    network = NETWORKS[args.network](patch[0])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = make_movie(workdir / "movie.zarr", shape=(64, 128, 128))
        print(
            f"network {args.network}, patch {patch}, batch {args.batch}/rank, "
            f"{args.steps} steps, {args.threads} torch thread(s)/worker"
        )
        print("| workers | samples/s | s/step | wall s |")
        print("|---|---|---|---|")
        for n in args.workers:
            result = run(
                source,
                workdir,
                workers=n,
                threads=args.threads,
                steps=args.steps,
                patch=patch,  # type: ignore[arg-type]
                batch=args.batch,
                network=network,
                gpus=args.gpus,
            )
            print(
                f"| {n} | {result['samples_per_s']:.2f} | {result['step_s']:.3f} | "
                f"{result['wall_s']:.1f} |"
            )


if __name__ == "__main__":
    main()
