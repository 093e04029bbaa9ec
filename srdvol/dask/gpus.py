"""Which GPUs this process may use, named as ``CUDA_VISIBLE_DEVICES`` names them.

A worker pinned with the same string (an index, ``GPU-<uuid>`` or ``MIG-<uuid>``) sees exactly
that device, so ids are kept as they are written; a GPU choice (:func:`srdvol.options.parse_gpus`)
names them by position among the visible ones or by id.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from srdvol.errors import ConfigError, GPUUnavailableError, flag
from srdvol.values import DEVICE_PREFIXES, GPUChoice

__all__ = ["resolve_gpus", "visible_gpus"]

logger = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """Return the GPUs this process may use, named as ``CUDA_VISIBLE_DEVICES`` names them.

    ``CUDA_VISIBLE_DEVICES`` wins when set: its entries are kept as they are written, device
    indices (``"5"``), UUIDs (``"GPU-8f3c..."``) or MIG instances (``"MIG-..."``), because a
    worker pinned with the same string sees exactly that device. Like CUDA, the list ends at the
    first entry that is none of these (an empty value or ``-1`` means no GPU). Without the
    variable, the count comes from ``torch.cuda.device_count()`` when torch was built with CUDA,
    or from ``nvidia-smi -L``, and the GPUs are ``"0"``, ``"1"``, ... A machine without GPUs
    gives ``[]``.

    Returns
    -------
    list of str
        Device identifiers in visible order; a position in this list is what a GPU choice of
        ``0,1`` means, the string is what a worker's ``CUDA_VISIBLE_DEVICES`` is set to.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(_count_gpus())]
    ids: list[str] = []
    for item in env.split(","):
        item = item.strip()
        if not (item.isdigit() or item.startswith(DEVICE_PREFIXES)):
            break  # CUDA ignores everything from the first invalid entry on
        ids.append(item)
    return ids


def _count_gpus() -> int:
    try:
        import torch

        if torch.backends.cuda.is_built() and torch.cuda.is_available():
            return int(torch.cuda.device_count())
    except Exception:  # a broken CUDA install must not stop the CPU path
        logger.debug("torch could not count GPUs", exc_info=True)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def resolve_gpus(gpus: GPUChoice) -> list[str]:
    """Turn a GPU choice (:func:`srdvol.options.parse_gpus`) into the devices to start workers
    on (``[]`` for CPU).

    Integers are positions in :func:`visible_gpus` (``0`` is the first visible GPU, whatever
    its physical index or UUID); strings must be ids from that list, written the same way.

    Returns
    -------
    list of str
        Device identifiers as ``CUDA_VISIBLE_DEVICES`` names them, one per worker.

    Raises
    ------
    GPUUnavailableError
        If GPUs are asked for that this machine does not show.
    ConfigError
        If the choice is not one :func:`~srdvol.options.parse_gpus` returns, or names one GPU
        twice.
    """
    present = visible_gpus()
    if gpus is None or gpus == "auto":
        return present
    if gpus == "none":
        return []
    if gpus == "all":
        if not present:
            raise GPUUnavailableError(
                f"{flag('gpus')} all",
                "no GPU is visible on this machine (torch and nvidia-smi find none, or "
                "CUDA_VISIBLE_DEVICES hides them)",
                f"run without {flag('gpus')} to use CPU workers, or on a machine with a GPU",
            )
        return present
    if isinstance(gpus, str):
        raise ConfigError(
            flag("gpus"), f"{gpus!r} is not a GPU choice", "give auto, all, none or ids"
        )
    wanted = list(gpus)
    subject = f"{flag('gpus')} {','.join(map(str, wanted))}"
    chosen: list[str] = []
    for entry in wanted:
        if isinstance(entry, str) and entry.isdigit():
            entry = int(entry)
        if isinstance(entry, int) and 0 <= entry < len(present):
            chosen.append(present[entry])
        elif isinstance(entry, str) and entry in present:
            chosen.append(entry)
        else:
            raise GPUUnavailableError(
                subject,
                f"GPU {entry} is not visible ({_describe_visible(present)})",
                "give positions in the visible list (0 is the first visible GPU) or ids as "
                f"CUDA_VISIBLE_DEVICES writes them, or run without {flag('gpus')} to use CPU "
                "workers",
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(subject, "the list names one GPU twice", "give each GPU once")
    return chosen


def _describe_visible(present: Sequence[str]) -> str:
    if not present:
        return "no GPU is visible"
    listed = ", ".join(f"{i}: {gpu}" for i, gpu in enumerate(present))
    return f"visible GPUs by position: {listed}"
