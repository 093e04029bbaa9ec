"""Denoise on a Dask cluster that is already running, by passing its scheduler address.

In real use the scheduler is started elsewhere, for example::

    dask scheduler --port 8786 &
    CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1 &
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://HOST:8786 --nthreads 1 --resources GPU=1 &
    srdvol denoise in.zarr out.zarr --scheduler tcp://HOST:8786

This script plays both parts on one machine: it starts a small local cluster, then runs srdvol
against its address exactly as the command above would.

    python examples/attach_scheduler.py WORKDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from distributed import LocalCluster

from srdvol.app.cli import main as srdvol


def run(workdir: Path, *, steps: int = 30) -> None:
    """Simulate a small recording, then train and predict through an existing scheduler."""
    workdir.mkdir(parents=True, exist_ok=True)
    noisy, truth = workdir / "noisy.zarr", workdir / "truth.zarr"
    model, out = workdir / "model.safetensors", workdir / "denoised.zarr"
    srdvol(["simulate", str(noisy), "--truth", str(truth), "--frames", "32", "--size", "64", "64"])
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        address = cluster.scheduler_address
        print(f"scheduler running at {address}")
        srdvol(
            [
                "train",
                str(noisy),
                str(model),
                "--patch",
                "16,32,32",
                "--steps",
                str(steps),
                "--scheduler",
                address,
            ]
        )
        srdvol(["predict", str(noisy), str(out), "--model", str(model), "--scheduler", address])
    srdvol(["evaluate", str(out), "--truth", str(truth), "--noisy", str(noisy)])


if __name__ == "__main__":
    try:
        run(Path(sys.argv[1] if len(sys.argv) > 1 else "attach-example"))
    except SystemExit as exc:  # srdvol's CLI exits; keep going only on success
        if exc.code:
            raise
