"""How much memory a worker has, and how much of it the engine's blocks may take.

The default blocks are sized to the worker (:func:`srdvol.core.tiling.plan_blocks`): host memory
bounds the blocks a worker holds at once, GPU memory bounds one block's region and sums, which
live on the GPU while the block runs. A local cluster's workers share this machine (one per
GPU, else CPU workers as :func:`srdvol.dask.cluster.open_cluster` starts them);
:func:`cluster_budget` asks the workers of a running cluster instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

__all__ = ["DEVICE_FRACTION", "HOST_FRACTION", "Budget", "cluster_budget", "local_budget"]

#: Share of a worker's host memory the blocks may fill. distributed starts moving a worker's
#: data to disk at 60 % of its limit; the rest is for the model, zarr's buffers, compression.
HOST_FRACTION = 0.3
#: Share of a GPU's memory one block's region (float32) and sums (float64) may take; the forward
#: passes fill another 40 % (:data:`srdvol.predict.predictors.DEVICE_FRACTION`).
DEVICE_FRACTION = 0.35


@dataclass(frozen=True)
class Budget:
    """Bytes the engine may use per worker.

    Attributes
    ----------
    host
        Host memory for blocks (``plan_blocks(memory=...)``).
    device
        GPU memory for one block's region and sums, or None without a GPU.
    worker_host
        The worker's whole host memory (for messages).
    """

    host: int
    device: int | None
    worker_host: int


def _gpu_memory(gpu: str) -> int | None:
    """Total memory of one GPU, named as ``CUDA_VISIBLE_DEVICES`` names it (nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", gpu],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return int(out.stdout.split()[0]) * 2**20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def local_budget(workers: int | None = None) -> Budget:
    """The budget of a worker of the local cluster ``srdvol`` would start on this machine.

    Parameters
    ----------
    workers
        Number of workers sharing the machine; default: one per visible GPU, else the CPU
        workers :func:`srdvol.dask.cluster.open_cluster` starts (up to 4, one per 2 cores).

    Returns
    -------
    Budget
        Deterministic for a machine (total, not free, memory), so a resumed run plans the
        same blocks as the run it resumes.
    """
    import psutil

    from srdvol.dask.gpus import visible_gpus

    gpus = visible_gpus()
    n = workers or (len(gpus) if gpus else max(1, min(4, (os.cpu_count() or 1) // 2)))
    host = int(psutil.virtual_memory().total // max(1, n))
    device = _gpu_memory(gpus[0]) if gpus else None
    return Budget(
        host=int(host * HOST_FRACTION),
        device=int(device * DEVICE_FRACTION) if device else None,
        worker_host=host,
    )


def _worker_gpu_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a broken CUDA install: plan for the host only
        return None
    return None


def cluster_budget(client: Any) -> Budget:
    """The budget of the smallest worker of a running cluster (memory limit, GPU memory).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    """
    from srdvol.dask.workers import live_workers

    workers = live_workers(client)
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    host = min((m for m in limits if m), default=0) or local_budget().worker_host
    with_gpu = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")]
    device = None
    if with_gpu:
        found = client.run(_worker_gpu_memory, workers=with_gpu)
        sizes = [v for v in found.values() if v]
        device = min(sizes) if sizes else None
    return Budget(
        host=int(host * HOST_FRACTION),
        device=int(device * DEVICE_FRACTION) if device else None,
        worker_host=host,
    )
