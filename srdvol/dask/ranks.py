"""One torch process per Dask worker: joining a process group, and running a function on
every rank.

The client picks a free port on the first worker's host and hands ``tcp://host:port``, the rank
and the world size (a :class:`GroupSpec`) to tasks pinned to each worker, which join one torch
process group (NCCL on GPU workers, gloo on CPU). Rank 0 alone reports progress, as events on
the job's topic; :mod:`srdvol.dask.supervise` watches the tasks from the client.
:func:`run_distributed` runs any function once per rank (one task each); srdvol's own training
(:mod:`srdvol.dask.ddp_train`) keeps the group alive across several tasks per rank.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from distributed import Client, get_worker

from srdvol.dask.supervise import (
    Job,
    StepReport,
    Watch,
    choose_backend,
    choose_workers,
    rendezvous,
    reporter,
    subscribed,
    supervise,
)
from srdvol.dask.workers import WorkerWatch
from srdvol.training.collective import PeerLostError, collective

__all__ = [
    "DEFAULT_TIMEOUT",
    "DDPContext",
    "GroupSpec",
    "RankOptions",
    "join_group",
    "leave_group",
    "run_distributed",
    "working",
]

logger = logging.getLogger(__name__)

#: Seconds a collective may wait for a silent peer before the process group gives up.
DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class RankOptions:
    """Which workers become ranks and how they talk.

    Attributes
    ----------
    workers
        Number of ranks (the first workers by name), explicit worker addresses, or ``None`` for
        every GPU worker (every worker when none has a GPU).
    backend
        ``"nccl"`` or ``"gloo"``; default NCCL on GPU workers, gloo otherwise.
    timeout
        Seconds a collective waits for a silent peer before the run fails.
    """

    workers: int | Sequence[str] | None = None
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT


_ALL_WORKERS = RankOptions()


@dataclass(frozen=True)
class GroupSpec:
    """How one rank joins its job's process group (small: it travels with every task).

    Attributes
    ----------
    rank, world_size
        This rank and the number of ranks.
    init_method
        The rendezvous, ``tcp://host:port`` on the rank-0 worker.
    backend
        ``"nccl"`` or ``"gloo"``.
    timeout
        Seconds a collective waits for a silent peer.
    topic
        Event topic the client listens on for this job.
    """

    rank: int
    world_size: int
    init_method: str
    backend: str
    timeout: float
    topic: str


@dataclass
class DDPContext:
    """What a training function running on one rank knows about the job.

    Attributes
    ----------
    rank, world_size
        This process's rank and the number of processes.
    backend
        ``"nccl"`` or ``"gloo"``.
    device
        Torch device name for this rank (``"cuda"``: the worker's own GPU, or ``"cpu"``).
    topic
        Event topic the client listens on for this job.
    """

    rank: int
    world_size: int
    backend: str
    device: str
    topic: str
    _last_report: float = field(default=0.0, repr=False)

    @classmethod
    def joined(cls, group: GroupSpec, device: str) -> DDPContext:
        """The context of a rank that joined ``group`` on ``device``."""
        return cls(group.rank, group.world_size, group.backend, device, group.topic)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and reports."""
        return self.rank == 0

    def wrap(self, module: Any) -> Any:
        """Wrap ``module`` (already on :attr:`device`) in DistributedDataParallel."""
        from torch.nn.parallel import DistributedDataParallel

        if self.device.startswith("cuda"):
            return DistributedDataParallel(module, device_ids=[0], output_device=0)
        return DistributedDataParallel(module)

    def report(
        self,
        step: int,
        *,
        total: int,
        loss: float,
        samples: int | None = None,
        samples_per_s: float | None = None,
    ) -> None:
        """Send a progress report to the client (rank 0 only; other ranks do nothing).

        Parameters
        ----------
        step, total
            Steps done (in all) and the total.
        loss
            The loss to show.
        samples
            Samples of all ranks done since this job started; the client divides them by its
            own wall time for the global rate.
        samples_per_s
            A rate measured here, used only when ``samples`` is not given.
        """
        if self.is_main:
            msg = {"kind": "progress", "step": int(step), "total": int(total), "loss": float(loss)}
            if samples is not None:
                msg["samples"] = int(samples)
            if samples_per_s is not None:
                msg["samples_per_s"] = float(samples_per_s)
            get_worker().log_event(self.topic, msg)

    def checkpoint_written(self, path: str, step: int) -> None:
        """Tell the client that rank 0 wrote a checkpoint (named if the run is interrupted)."""
        if self.is_main:
            msg = {"kind": "checkpoint", "path": str(path), "step": int(step)}
            get_worker().log_event(self.topic, msg)


# --------------------------------------------------------------------------------------------
# Worker side: the process group

#: Jobs whose task runs in this worker process right now (one job at a time per worker).
_BUSY: set[str] = set()
_BUSY_LOCK = threading.Lock()


@contextlib.contextmanager
def working(job: str) -> Iterator[None]:
    """Mark ``job`` as running a task in this worker while inside."""
    with _BUSY_LOCK:
        _BUSY.add(job)
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY.discard(job)


def join_group(group: GroupSpec) -> str:
    """Join the job's torch process group; return this rank's device name.

    A group left behind in this worker by a job that failed is left first; one of a job that
    still runs here is an error (one job at a time per worker).
    """
    import torch
    import torch.distributed as dist

    device = "cuda" if group.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)  # the worker sees only its own GPU
    if dist.is_initialized():
        with _BUSY_LOCK:
            busy = sorted(_BUSY - {group.topic})
        if busy:
            raise RuntimeError(f"this worker is still running job {busy[0]}; one job at a time")
        leave_group()
    with collective("joining the process group"):
        dist.init_process_group(
            group.backend,
            init_method=group.init_method,
            rank=group.rank,
            world_size=group.world_size,
            timeout=timedelta(seconds=group.timeout),
        )
    return device


def leave_group() -> None:
    """Tear down this worker's process group (quietly: a broken one cannot always be)."""
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_task(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, group: GroupSpec
) -> Any:
    """Join the process group, run ``fn(ctx, *args, **kwargs)``, leave the group."""
    with working(group.topic):
        device = join_group(group)
        try:
            return fn(DDPContext.joined(group, device), *args, **kwargs)
        except RuntimeError as exc:
            if not isinstance(exc, PeerLostError) and _raised_by_collective(exc):
                raise PeerLostError(f"a collective call failed: {exc}") from exc
            raise
        finally:
            leave_group()


#: Where torch raises when a collective fails: the process-group code, DDP, and autograd
#: running DDP's all-reduce hooks.
_COLLECTIVE_MODULES = ("torch.distributed", "torch.nn.parallel.distributed", "torch.autograd")


def _raised_by_collective(exc: BaseException) -> bool:
    """True when ``exc`` came out of torch's distributed machinery (by the module of the
    innermost Python frame that raised it): a function run on every rank that does not wrap
    its collectives in :func:`~srdvol.training.collective.collective` still tells a lost peer
    from its own errors."""
    import torch.distributed as dist

    frame = None
    tb = exc.__traceback__
    while tb is not None:
        frame, tb = tb.tb_frame, tb.tb_next
    module = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
    if module.startswith("torch.autograd"):
        return dist.is_initialized()
    return module.startswith(_COLLECTIVE_MODULES)


# --------------------------------------------------------------------------------------------
# Client side


def run_distributed(
    client: Client,
    fn: Callable[..., Any],
    *args: Any,
    ranks: RankOptions = _ALL_WORKERS,
    on_progress: Callable[[StepReport], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(ctx, *args, **kwargs)`` on one rank per worker, joined by torch.distributed.

    Parameters
    ----------
    client
        Client of the cluster to train on.
    fn
        Training function, importable on the workers (a module-level function). It receives a
        :class:`DDPContext` first; rank 0's return value is returned.
    *args, **kwargs
        Passed to ``fn``; they travel through the scheduler, so keep them small (paths, options).
    ranks
        Which workers become ranks, the backend and the collectives' timeout
        (:class:`RankOptions`; every GPU worker, or every worker when none has a GPU).
    on_progress
        Called on the client with each :class:`StepReport` report of rank 0.

    Returns
    -------
    object
        What ``fn`` returned on rank 0.

    Raises
    ------
    TrainingInterruptedError
        If a worker dies or a rank loses contact with the others.
    """
    chosen, on_gpus = choose_workers(client, ranks.workers)
    backend = choose_backend(on_gpus, ranks.backend)
    addresses = [a for a, _ in chosen]
    topic = f"srdvol-ddp-{uuid.uuid4().hex[:12]}"
    rendezvous_at = rendezvous(client, addresses[0])
    group = GroupSpec(0, len(addresses), rendezvous_at, backend, ranks.timeout, topic)
    logger.info("distributed run on %d ranks via %s (%s)", len(chosen), group.init_method, backend)
    watch = Watch()
    with subscribed(client, topic) as events:
        futures = [
            client.submit(
                _rank_task,
                fn,
                args,
                kwargs,
                group=replace(group, rank=rank),
                workers=[address],
                allow_other_workers=False,
                resources={"GPU": 1} if backend == "nccl" else None,
                pure=False,
                key=f"{topic}-rank-{rank}",
            )
            for rank, address in enumerate(addresses)
        ]
        job = Job(
            client,
            chosen,
            futures,
            {f.key: r for r, f in enumerate(futures)},
            events,
            watch,
            reporter(on_progress, watch),
            WorkerWatch(client, addresses),
        )
        try:
            supervise(job)
            return futures[0].result()
        finally:
            client.cancel([f for f in futures if not f.done()], force=True)
