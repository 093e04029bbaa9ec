"""Distributed training across Dask workers with torch.distributed (DistributedDataParallel).

One task per worker joins a torch process group: the client picks a free port on the first
worker's host, then hands ``tcp://host:port``, the rank and the world size to one task pinned to
each worker (NCCL on GPU workers, gloo on CPU). Each task runs the training function with a
:class:`DDPContext`, then leaves the group. Rank 0 alone writes files and reports progress;
the client turns its reports into one progress stream for the whole job.

A worker that dies, or a rank that loses contact with the others, ends the run with a
:class:`~srdvol.errors.TrainingInterruptedError` naming the worker, the step reached and the last
checkpoint. An error raised by the training code itself (bad data, bad options) reaches the
caller unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from distributed import Client, Future, get_worker, wait
from distributed.comm import get_address_host

from srdvol.errors import ConfigError, TrainingInterruptedError
from srdvol.training import Trainer, TrainingPlan, prepare_training, run_training

__all__ = [
    "DDPContext",
    "Progress",
    "plan_training",
    "progress_bar",
    "run_distributed",
    "train_distributed",
    "train_rank",
]

logger = logging.getLogger(__name__)

#: Seconds a collective may wait for a silent peer before the process group gives up.
DEFAULT_TIMEOUT = 300.0
_POLL = 0.25


@dataclass(frozen=True)
class Progress:
    """One progress report of rank 0, as the client receives it."""

    step: int
    total: int
    loss: float
    samples_per_s: float


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

    def report(self, step: int, *, total: int, loss: float, samples_per_s: float) -> None:
        """Send a progress report to the client (rank 0 only; other ranks do nothing)."""
        if self.is_main:
            msg = {
                "kind": "progress",
                "step": int(step),
                "total": int(total),
                "loss": float(loss),
                "samples_per_s": float(samples_per_s),
            }
            get_worker().log_event(self.topic, msg)

    def checkpoint_written(self, path: str, step: int) -> None:
        """Tell the client that rank 0 wrote a checkpoint (named if the run is interrupted)."""
        if self.is_main:
            msg = {"kind": "checkpoint", "path": str(path), "step": int(step)}
            get_worker().log_event(self.topic, msg)


# --------------------------------------------------------------------------------------------
# Worker side


def _free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` right now (runs on the rank-0 worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _rank_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    timeout: float,
    topic: str,
) -> Any:
    """Join the process group, run ``fn(ctx, *args, **kwargs)``, leave the group."""
    import torch
    import torch.distributed as dist

    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)  # the worker sees only its own GPU
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        ctx = DDPContext(rank, world_size, backend, device, topic)
        return fn(ctx, *args, **kwargs)
    finally:
        with contextlib.suppress(Exception):  # a broken group cannot always be torn down
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Client side


def _choose_workers(
    client: Client, workers: int | Sequence[str] | None
) -> tuple[list[tuple[str, str]], bool]:
    """Return ``[(address, name), ...]`` in rank order and whether they are GPU workers."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        raise ConfigError(
            "distributed training", "the cluster has no workers", "start workers or wait for them"
        )
    gpu = {a for a, w in info.items() if w.get("resources", {}).get("GPU", 0) >= 1}
    pool = sorted(gpu or info, key=lambda a: (str(info[a].get("name", a)), a))
    if isinstance(workers, int):
        if workers < 1 or workers > len(pool):
            raise ConfigError(
                "--workers",
                f"{workers} training processes asked for, the cluster has {len(pool)} "
                f"{'GPU ' if gpu else ''}workers",
                f"give a number from 1 to {len(pool)}",
            )
        pool = pool[:workers]
    elif workers is not None:
        unknown = [a for a in workers if a not in info]
        if unknown:
            raise ConfigError(
                "workers", f"{', '.join(unknown)} are not workers of this cluster", "check them"
            )
        pool = list(workers)
    return [(a, str(info[a].get("name", a))) for a in pool], bool(gpu) and set(pool) <= gpu


@dataclass
class _Watch:
    """What the client knows about a running job, for progress and for failure messages."""

    step: int = 0
    total: int = 0
    checkpoint: str | None = None
    checkpoint_step: int = 0


def run_distributed(
    client: Client,
    fn: Callable[..., Any],
    *args: Any,
    workers: int | Sequence[str] | None = None,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_progress: Callable[[Progress], None] | None = None,
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
    workers
        Number of ranks (the first workers by name), explicit worker addresses, or ``None`` for
        every GPU worker (every worker when none has a GPU).
    backend
        ``"nccl"`` or ``"gloo"``; default NCCL on GPU workers, gloo otherwise.
    timeout
        Seconds a collective waits for a silent peer before the run fails.
    on_progress
        Called on the client with each :class:`Progress` report of rank 0.

    Returns
    -------
    object
        What ``fn`` returned on rank 0.

    Raises
    ------
    TrainingInterruptedError
        If a worker dies or a rank loses contact with the others.
    """
    chosen, on_gpus = _choose_workers(client, workers)
    backend = backend or ("nccl" if on_gpus else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError("backend", f"{backend!r} is not nccl or gloo", "pick one of them")
    addresses = [a for a, _ in chosen]
    host = get_address_host(addresses[0])
    port = client.run(_free_port, host, workers=[addresses[0]])[addresses[0]]
    init_method = f"tcp://{host}:{port}"
    topic = f"srdvol-ddp-{uuid.uuid4().hex[:12]}"
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    logger.info("distributed training on %d ranks via %s (%s)", len(chosen), init_method, backend)

    futures: list[Future] = []
    try:
        for rank, address in enumerate(addresses):
            futures.append(
                client.submit(
                    _rank_task,
                    fn,
                    args,
                    kwargs,
                    rank=rank,
                    world_size=len(addresses),
                    init_method=init_method,
                    backend=backend,
                    timeout=timeout,
                    topic=topic,
                    workers=[address],
                    allow_other_workers=False,
                    resources={"GPU": 1} if backend == "nccl" else None,
                    pure=False,
                    key=f"{topic}-rank-{rank}",
                )
            )
        watch = _Watch()
        _supervise(client, futures, chosen, events, watch, on_progress)
        return futures[0].result()
    finally:
        client.unsubscribe_topic(topic)
        client.cancel([f for f in futures if not f.done()], force=True)


def _supervise(
    client: Client,
    futures: list[Future],
    ranks: list[tuple[str, str]],
    events: queue.SimpleQueue[dict[str, Any]],
    watch: _Watch,
    on_progress: Callable[[Progress], None] | None,
) -> None:
    """Wait for every rank, forwarding reports; raise on the first sign of a failed rank."""
    while True:
        _drain(events, watch, on_progress)
        if all(f.status == "finished" for f in futures):
            _drain(events, watch, on_progress)
            return
        lost = _lost_ranks(client, ranks)
        failed = [r for r, f in enumerate(futures) if f.status in ("error", "cancelled")]
        if lost or failed:
            _fail(client, futures, ranks, events, watch, on_progress, lost)
        # ``wait`` looks for a default client; an attached client is deliberately not one.
        with contextlib.suppress(TimeoutError), client.as_current():
            wait(futures, timeout=_POLL, return_when="FIRST_COMPLETED")
            time.sleep(_POLL)  # some ranks may be done: do not spin on them


def _drain(
    events: queue.SimpleQueue[dict[str, Any]],
    watch: _Watch,
    on_progress: Callable[[Progress], None] | None,
) -> None:
    while True:
        try:
            msg = events.get_nowait()
        except queue.Empty:
            return
        if msg.get("kind") == "checkpoint":
            watch.checkpoint, watch.checkpoint_step = msg["path"], int(msg["step"])
        elif msg.get("kind") == "progress":
            watch.step, watch.total = int(msg["step"]), int(msg["total"])
            if on_progress is not None:
                on_progress(Progress(watch.step, watch.total, msg["loss"], msg["samples_per_s"]))


def _lost_ranks(client: Client, ranks: list[tuple[str, str]]) -> list[int]:
    alive = set(client.scheduler_info(n_workers=-1)["workers"])
    return [r for r, (address, _) in enumerate(ranks) if address not in alive]


def _is_communication_error(exc: BaseException) -> bool:
    """True for errors that mean "a peer went away" rather than a bug or bad data."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError | TimeoutError | ConnectionError):
        return True
    if type(exc).__name__ == "KilledWorker":
        return True
    text = str(exc).lower()
    return any(
        word in text
        for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out")
    )


def _fail(
    client: Client,
    futures: list[Future],
    ranks: list[tuple[str, str]],
    events: queue.SimpleQueue[dict[str, Any]],
    watch: _Watch,
    on_progress: Callable[[Progress], None] | None,
    lost: list[int],
) -> None:
    """Work out why the run stopped and raise the clearest error for it."""
    # The first symptom is often a peer's "connection closed"; give the scheduler a moment to
    # notice the dead worker and the failing rank a moment to report its own error.
    deadline = time.monotonic() + 5.0
    while True:
        errors = {r: f.exception() for r, f in enumerate(futures) if f.status == "error"}
        own = [e for e in errors.values() if e is not None and not _is_communication_error(e)]
        if own and not lost:  # the training code failed on a rank: that error is the news
            raise own[0]
        if lost or all(f.done() for f in futures) or time.monotonic() > deadline:
            break
        time.sleep(_POLL)
        lost = _lost_ranks(client, ranks)
    _drain(events, watch, on_progress)
    where = _where(watch)
    resume = (
        f"the last checkpoint is {watch.checkpoint} (step {watch.checkpoint_step}); rerun the "
        "same command to resume from it"
        if watch.checkpoint
        else "no checkpoint was written yet; rerun the command to start again"
    )
    if lost:
        names = ", ".join(f"{ranks[r][1]} ({ranks[r][0]}, rank {r})" for r in lost)
        raise TrainingInterruptedError(
            "distributed training",
            f"worker {names} stopped {where} (it died or lost contact with the scheduler, "
            "often from running out of memory)",
            f"{resume}, and check that worker's log and memory",
        )
    rank, exc = next(iter(errors.items())) if errors else (0, None)
    raise TrainingInterruptedError(
        "distributed training",
        f"rank {rank} on worker {ranks[rank][1]} ({ranks[rank][0]}) lost contact with the other "
        f"ranks {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if exc else 'cancelled'})",
        f"{resume}, and check the network between the workers",
    )


def _where(watch: _Watch) -> str:
    if watch.total:
        return f"at step {watch.step} of {watch.total}"
    return "before the first step" if watch.step == 0 else f"at step {watch.step}"


@contextlib.contextmanager
def _no_progress() -> Iterator[Callable[[Progress], None]]:
    yield lambda progress: None


def progress_bar(*, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """A rich progress bar for :func:`run_distributed`'s ``on_progress`` (one bar per job).

    Examples
    --------
    >>> with progress_bar() as show:  # doctest: +SKIP
    ...     run_distributed(client, fn, on_progress=show)
    """
    if not enabled:
        return _no_progress()
    return _rich_bar()


@contextlib.contextmanager
def _rich_bar() -> Iterator[Callable[[Progress], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    columns = (
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} · {task.fields[rate]} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Bar(*columns) as bar:
        task = bar.add_task("train", total=None, loss="-", rate="-")

        def show(progress: Progress) -> None:
            bar.update(
                task,
                completed=progress.step,
                total=progress.total,
                loss=f"{progress.loss:.4f}",
                rate=f"{progress.samples_per_s:.1f}",
            )

        yield show


# --------------------------------------------------------------------------------------------
# srdvol training across workers (srdvol.training's prepare_training on the client, run_training
# on every rank)


def plan_training(
    client: Client,
    source: str | os.PathLike[str] | Any,
    model_path: str | os.PathLike[str],
    *,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    workers: int | Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Check the options and the data on the client; return the keyword arguments of
    :func:`train_rank` (what every rank needs, small enough to travel through the scheduler).

    Parameters are those of :func:`train_distributed`; ``options`` go to
    :func:`srdvol.training.prepare_training` (patch, sampling, steps, batch_size, lr, seed,
    network, resume, overwrite, level, axes, channel) for as many ranks as workers are chosen,
    so a distributed run accepts and refuses what :func:`srdvol.training.train` does; like it,
    starting afresh with ``overwrite`` deletes a stale training state. The result also holds
    ``"workers"``, the chosen worker addresses in rank order (pop it before sending).
    """
    addresses = [a for a, _ in _choose_workers(client, workers)[0]]
    plan = prepare_training(source, model_path, world_size=len(addresses), **options)
    return {
        "plan": plan.portable(),  # without the state's tensors: each rank reads the file
        "checkpoint_every": checkpoint_every,
        "stop_after": stop_after,
        "workers": addresses,
    }


def train_rank(
    ctx: DDPContext,
    *,
    plan: TrainingPlan,
    checkpoint_every: int,
    stop_after: int | None,
    on_finish: Callable[[Trainer], None] | None = None,
) -> Any:
    """One rank of :func:`train_distributed`: :func:`srdvol.training.run_training` with a
    DDP-wrapped network, this rank's patch stream and progress reports to the client.

    Every rank checkpoints at the same steps (the per-rank random streams are gathered); rank 0
    writes the training state and, at the end, the model file, and returns the model record.
    ``plan`` is the :class:`srdvol.training.TrainingPlan` of :func:`plan_training`;
    ``on_finish`` is passed to :func:`~srdvol.training.run_training` (called on every rank with
    its trainer when the loop ends).
    """
    from functools import partial

    record = run_training(
        plan,
        device=ctx.device,
        rank=ctx.rank,
        world_size=ctx.world_size,
        wrap=ctx.wrap,
        checkpoint_every=checkpoint_every,
        stop_after=stop_after,
        make_trainer=partial(
            _ReportingTrainer, ctx=ctx, samples_per_step=plan.batch_size * ctx.world_size
        ),
        on_checkpoint=lambda path, step: ctx.checkpoint_written(str(path), step),
        on_finish=on_finish,
    )
    return record if ctx.is_main else None


class _ReportingTrainer(Trainer):
    """A Trainer that keeps its losses and reports progress to the client (rank 0)."""

    def __init__(self, *args: Any, ctx: DDPContext, samples_per_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        self.samples_per_step = samples_per_step
        self._last: float | None = None

    def step(self, batch: Any) -> float:
        start = self._last if self._last is not None else time.perf_counter()
        loss = super().step(batch)
        now = time.perf_counter()
        self._last = now
        rate = self.samples_per_step / max(now - start, 1e-9)
        self.ctx.report(self.step_count, total=self.steps, loss=loss, samples_per_s=rate)
        return loss


def train_distributed(
    client: Client,
    source: str | os.PathLike[str] | Any,
    model_path: str | os.PathLike[str],
    *,
    patch: tuple[int, int, int] | None = None,
    sampling: str = "spatial",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    network: Any | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
    stop_after: int | None = None,
    workers: int | Sequence[str] | None = None,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_progress: Callable[[Progress], None] | None = None,
) -> Any:
    """Train an SRDTrans model with one DistributedDataParallel rank per Dask worker.

    Options mean what they mean for :func:`srdvol.training.train`, except ``batch_size``, which
    is per rank: the global batch is ``batch_size * ranks`` patches, whose gradients DDP
    averages. The learning rate is not scaled with the number of ranks: averaging keeps the
    gradient's size and only lowers its noise, and Adam already divides each step by the
    gradient's running RMS; with many ranks a larger ``lr`` (e.g. times sqrt(ranks)) may pay,
    which is left to the user. Each rank
    samples its own patches lazily from the store; rank 0 writes ``MODEL.state`` every
    ``checkpoint_every`` steps and the model file at the end. ``source`` and ``model_path``
    must be reachable under the same names from every worker (a shared file system or a URL).

    Parameters
    ----------
    client
        Client of the cluster (:func:`srdvol.cluster.open_cluster`).
    workers
        Number of ranks, worker addresses, or ``None`` for every GPU worker (every worker
        when none has a GPU).
    backend, timeout
        See :func:`run_distributed`.
    progress
        Show one progress bar (rank 0's step, loss, samples/s) on the client.
    on_progress
        Called with each :class:`Progress` report instead of the bar.

    Returns
    -------
    ModelRecord
        The record written with the model.

    Raises
    ------
    TrainingInterruptedError
        If a worker dies or loses contact; the message names the last training state, and
        ``resume=True`` continues from it (with the same number of ranks).
    """
    plan = plan_training(
        client,
        source,
        model_path,
        patch=patch,
        sampling=sampling,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        network=network,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        level=level,
        axes=axes,
        channel=channel,
        stop_after=stop_after,
        workers=workers,
    )
    addresses = plan.pop("workers")
    reason = plan["plan"].sampling_reason
    if reason and progress:
        print(f"sampling auto: {reason}")  # the same line single-process training prints
    with progress_bar(enabled=progress and on_progress is None) as show:
        return run_distributed(
            client,
            train_rank,
            workers=addresses,
            backend=backend,
            timeout=timeout,
            on_progress=on_progress or show,
            **plan,
        )
