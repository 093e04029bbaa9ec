"""Distributed training throughput: samples/s of srdvol's DDP training, measured on every rank.

Run ``python benchmarks/training_throughput.py`` (options: ``--runs 1x2 2x1`` as workers x torch
threads per worker, ``--steps``, ``--warmup``, ``--patch T Y X``, ``--batch``, ``--network
tiny|small|default``, ``--gpus``). It writes a synthetic movie to a temporary Zarr store, then
for each run starts a local cluster (:func:`srdvol.dask.cluster.open_cluster`) and trains with
srdvol's own distributed path: :func:`srdvol.dask.ddp_train.plan_training` on the client, then one
:func:`srdvol.training.loop.run_training` per rank through
:func:`srdvol.dask.ranks.run_distributed` (DistributedDataParallel, gloo on CPU), exactly what
:func:`srdvol.dask.ddp_train.train_rank` runs, with a Trainer that also time-stamps each of its
steps on its own rank. Reported per run:

- samples/s: the **sum over ranks** of each rank's own rate, its patches per second between the
  end of its step ``--warmup`` and the end of its last step, on its own clock (each interval
  holds the patch reads, the step and the gradient all-reduce); also every rank's own rate;
- s/step: the mean over ranks of each rank's seconds per step in that window;
- CPU s/step: each rank's process CPU time per step (threads spinning count here);
- wall: the whole call (statistics, rendezvous, training, model write);
- the load average before and after (the machine may be shared).

On a machine with 2 cores the fair single-process baseline is ``1x2`` (one rank using both
cores), against ``2x1`` (two ranks of one thread). On a GPU machine pass ``--gpus all`` and
``--runs 1x1 2x1``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from srdvol.dask.cluster import open_cluster
from srdvol.dask.ddp_train import plan_training
from srdvol.dask.ranks import RankOptions, run_distributed
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


def timed_rank(ctx: Any, *, plan: Any) -> Any:
    """One rank of srdvol's distributed training (what ``train_rank`` runs), time-stamping the
    end of each step; returns every rank's stamps and CPU times, gathered on rank 0."""
    import torch.distributed as dist

    from srdvol.training.loop import run_training
    from srdvol.training.trainer import Rank, Trainer

    stamps: list[tuple[float, float]] = []

    class TimedTrainer(Trainer):
        def step(self, batch: Any) -> float:
            loss = super().step(batch)
            stamps.append((time.perf_counter(), time.process_time()))
            return loss

    run_training(
        plan,
        device=ctx.device,
        place=Rank(ctx.rank, ctx.world_size, ctx.wrap),
        make_trainer=TimedTrainer,
    )
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, stamps)  # the process group is open until this returns
    return gathered


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def run(
    source: str,
    workdir: Path,
    *,
    workers: int,
    threads: int,
    steps: int,
    warmup: int,
    patch: tuple[int, int, int],
    batch: int,
    network: NetworkConfig,
    gpus: str | None,
) -> dict[str, Any]:
    """Train once on ``workers`` ranks of ``threads`` torch threads; measure every rank."""
    before = load()
    with open_cluster(
        gpus=gpus or "none",
        workers=workers,
        threads_per_worker=threads,
        dashboard_address=None,
    ) as client:
        client.wait_for_workers(workers, timeout=120)
        start = time.perf_counter()
        kwargs = plan_training(
            client,
            source,
            workdir / f"model-{workers}x{threads}.srdvol",
            axes="tyx",
            patch=patch,
            batch_size=batch,
            steps=steps,
            network=network,
            checkpoint_every=steps,
            overwrite=True,
            ranks=RankOptions(workers=workers),
        )
        chosen = kwargs.pop("workers")
        ranks = run_distributed(client, timed_rank, ranks=RankOptions(chosen), **kwargs)
        wall = time.perf_counter() - start
    rates, step_s, cpu_s = [], [], []
    for stamps in ranks:
        (t0, c0), (t1, c1) = stamps[warmup - 1], stamps[-1]
        n = len(stamps) - warmup
        rates.append(batch * n / (t1 - t0))
        step_s.append((t1 - t0) / n)
        cpu_s.append((c1 - c0) / n)
    return {
        "run": f"{workers}x{threads}",
        "samples_per_s": sum(rates),
        "rank_rates": rates,
        "step_s": statistics.fmean(step_s),
        "cpu_s": cpu_s,
        "wall_s": wall,
        "load": f"{before} -> {load()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["1x2", "2x1"], help="workers x threads")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 64, 64))
    parser.add_argument("--batch", type=int, default=2, help="patches per rank and step")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="default")
    parser.add_argument("--gpus", default=None, help="auto, all or ids; default CPU workers")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    patch = tuple(args.patch)
    network = NETWORKS[args.network](patch[0])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = make_movie(workdir / "movie.zarr", shape=(64, 128, 128))
        print(
            f"{args.network} network, patch {patch}, batch {args.batch}/rank, {args.steps} steps "
            f"({args.warmup} left out), {os.cpu_count()} CPU cores"
        )
        print(
            "| workers x threads | samples/s (sum of ranks) | per rank | s/step | CPU s/step "
            "per rank | wall s | load average before -> after |"
        )
        print("|---|---|---|---|---|---|---|")
        for spec in args.runs:
            workers, threads = (int(v) for v in spec.split("x"))
            r = run(
                source,
                workdir,
                workers=workers,
                threads=threads,
                steps=args.steps,
                warmup=args.warmup,
                patch=patch,  # type: ignore[arg-type]
                batch=args.batch,
                network=network,
                gpus=args.gpus,
            )
            print(
                f"| {r['run']} | {r['samples_per_s']:.2f} | "
                f"{', '.join(f'{v:.2f}' for v in r['rank_rates'])} | {r['step_s']:.3f} | "
                f"{', '.join(f'{v:.3f}' for v in r['cpu_s'])} | {r['wall_s']:.1f} | {r['load']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
