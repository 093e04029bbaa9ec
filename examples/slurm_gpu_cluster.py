"""Denoise on a SLURM cluster with dask-jobqueue: one GPU per job, one Dask worker per GPU.

Needs SLURM (the test suite runs its cluster part with a stand-in ``sbatch`` that executes the
job script on the test machine); install with ``pip install "srdvol[jobqueue]"``. Each job asks
SLURM for one GPU (``--gres=gpu:1``); SLURM sets ``CUDA_VISIBLE_DEVICES`` inside the job, and the
worker advertises the resource ``GPU=1`` so srdvol places exactly one training rank or prediction
task on each GPU. The model file and the stores must be on a file system every node sees.

    python examples/slurm_gpu_cluster.py /shared/in.zarr /shared/out.zarr --jobs 8
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from srdvol.app.cli import main as srdvol

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster


def slurm_cluster(*, partition: str = "gpu", walltime: str = "04:00:00") -> SLURMCluster:
    """A dask-jobqueue SLURM cluster whose every job is one GPU and one single-task worker."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=partition,
        cores=8,  # CPU cores per job: decompression and data loading for one GPU
        processes=1,  # one worker process per job, so one worker per GPU
        memory="64GB",
        walltime=walltime,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1", "--nthreads", "1"],
    )


def main() -> None:
    """Start the SLURM cluster, then run ``srdvol denoise`` against its scheduler."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--jobs", type=int, default=4, help="GPU jobs (= Dask workers)")
    parser.add_argument("--partition", default="gpu")
    parser.add_argument("--walltime", default="04:00:00")
    args = parser.parse_args()

    cluster = slurm_cluster(partition=args.partition, walltime=args.walltime)
    cluster.scale(jobs=args.jobs)
    print(f"dashboard: {cluster.dashboard_link}")
    try:
        srdvol(["denoise", args.input, args.output, "--scheduler", cluster.scheduler_address])
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
