"""Distributed training across Dask workers with torch.distributed (DistributedDataParallel).

The client picks a free port on the first worker's host and hands ``tcp://host:port``, the rank
and the world size to tasks pinned to each worker, which join one torch process group (NCCL on
GPU workers, gloo on CPU). Rank 0 alone writes files and reports progress; the client turns its
reports into one progress display whose samples/s is the global rate (global samples over the
client's wall time).

srdvol's own training (:func:`train_distributed`) runs as a chain of *segment* tasks per rank,
all submitted at once: segment k trains up to the k-th checkpoint, depends on segment k-1 of the
same rank and is pinned to the same worker, so the dashboard shows training advance as segments
finish (``srdvol-training`` N of ranks x segments). The process group and the
:class:`~srdvol.training.loop.TrainingRun` stay alive in the worker process between segments, keyed
by the job id, and are torn down after the last segment, on a stop, or on a failure.
:func:`run_distributed` runs any function once per rank (one task each).

A worker counts as dead only when the scheduler's own answers confirm it
(:class:`srdvol.dask.cluster.WorkerWatch`); a dead worker or a rank that loses contact with the others
ends the run with a :class:`~srdvol.errors.TrainingInterruptedError` naming the worker, the step
reached and the last checkpoint. An error raised by the training code itself (bad data, bad
options) reaches the caller unchanged. Ctrl-C or SIGTERM on the client (or on the workers' process
group) stops every rank at the same step, saves the training state and raises
:class:`srdvol.interrupt.Interrupted` noting it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from distributed import Client, Future, get_worker
from distributed.comm import get_address_host

from srdvol import interrupt
from srdvol.dask.cluster import CONFIRM_LOST, WorkerWatch, live_workers
from srdvol.errors import ConfigError, TrainingInterruptedError
from srdvol.training.loop import (
    Trainer,
    TrainingPlan,
    TrainingRun,
    agree,
    kept_text,
    prepare_training,
    run_training,
)

__all__ = [
    "DDPContext",
    "Progress",
    "plan_training",
    "run_distributed",
    "train_distributed",
    "train_rank",
]

logger = logging.getLogger(__name__)

#: Seconds a collective may wait for a silent peer before the process group gives up.
DEFAULT_TIMEOUT = 300.0
#: Seconds the client waits for the ranks to save their state after a Ctrl-C or SIGTERM.
STOP_GRACE = 300.0
#: Task-name prefix of the training segments (what the dashboard shows).
SEGMENT_PREFIX = "srdvol-training"
_POLL = 0.25


@dataclass(frozen=True)
class Progress:
    """One progress report of rank 0, as the client receives it.

    ``samples_per_s`` is the global rate: samples of all ranks since the job started over the
    client's wall time.
    """

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


def _free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` right now (runs on the rank-0 worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _join_group(
    *, rank: int, world_size: int, init_method: str, backend: str, timeout: float
) -> str:
    """Join the job's torch process group; return this rank's device name."""
    import torch
    import torch.distributed as dist

    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)  # the worker sees only its own GPU
    if dist.is_initialized():
        with _SESSIONS_LOCK:
            busy = [job for job, s in _SESSIONS.items() if s.busy]
        if busy:
            raise RuntimeError(
                f"this worker is still running training job {busy[0]}; one job at a time"
            )
        _leave_group()  # a group left behind by a job that failed on this worker
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    return device


def _leave_group() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a broken group cannot always be torn down
        if dist.is_initialized():
            dist.destroy_process_group()


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
    device = _join_group(
        rank=rank, world_size=world_size, init_method=init_method, backend=backend, timeout=timeout
    )
    try:
        ctx = DDPContext(rank, world_size, backend, device, topic)
        return fn(ctx, *args, **kwargs)
    finally:
        _leave_group()


# --------------------------------------------------------------------------------------------
# Worker side: training sessions that live across segment tasks


@dataclass
class _Session:
    """One rank's training job in this worker process, between its segment tasks."""

    run: TrainingRun
    ctx: DDPContext
    start: int
    samples_per_step: int
    stop: bool = False
    busy: bool = False

    def should_stop(self) -> bool:
        """Every rank agrees (one tiny all-reduce per step) whether any was asked to stop."""
        asked = self.stop or interrupt.requested() is not None
        return agree(asked, self.ctx.world_size, self.run.device)

    def report(self, step: int, loss: float) -> None:
        self.ctx.report(
            step,
            total=self.run.plan.steps,
            loss=loss,
            samples=(step - self.start) * self.samples_per_step,
        )


_SESSIONS: dict[str, _Session] = {}
_STOPS: set[str] = set()  # stop requests that arrived before their session opened
_SESSIONS_LOCK = threading.Lock()


def _open_session(
    job: str,
    *,
    plan: TrainingPlan,
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    timeout: float,
    topic: str,
) -> _Session:
    interrupt.clear()  # a signal recorded before this job is not a request to stop it
    device = _join_group(
        rank=rank, world_size=world_size, init_method=init_method, backend=backend, timeout=timeout
    )
    try:
        ctx = DDPContext(rank, world_size, backend, device, topic)
        run = TrainingRun(
            plan,
            device=device,
            rank=rank,
            world_size=world_size,
            wrap=ctx.wrap,
            on_checkpoint=lambda path, step: ctx.checkpoint_written(str(path), step),
        )
    except BaseException:
        _leave_group()
        raise
    session = _Session(run, ctx, start=run.step, samples_per_step=plan.batch_size * world_size)
    with _SESSIONS_LOCK:
        _SESSIONS[job] = session
        session.stop = job in _STOPS
    return session


def _close_session(job: str) -> None:
    with _SESSIONS_LOCK:
        _SESSIONS.pop(job, None)
        _STOPS.discard(job)
    _leave_group()


def _request_stop(job: str) -> bool:
    """Ask this worker's rank of ``job`` to stop at its next step (runs on the worker)."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(job)
        if session is None:
            _STOPS.add(job)
            return False
        session.stop = True
        return True


def _drop_session(job: str) -> bool:
    """Forget an idle session of a failed job (runs on the worker); a busy one ends itself."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(job)
        if session is None or session.busy:
            return False
    _close_session(job)
    return True


def _train_segment(
    previous: dict[str, Any] | None,
    *,
    job: str,
    segment: int,
    until: int,
    last: bool,
    plan: TrainingPlan,
    checkpoint_every: int,
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    timeout: float,
    topic: str,
) -> dict[str, Any]:
    """One segment of one rank: train up to step ``until``; the last one writes the model.

    ``previous`` is the result of the segment before (its dependency); after a stop the
    remaining segments only pass the stopped result on.
    """
    if previous is not None and previous.get("stopped"):
        return previous
    if segment == 0:
        session = _open_session(
            job,
            plan=plan,
            rank=rank,
            world_size=world_size,
            init_method=init_method,
            backend=backend,
            timeout=timeout,
            topic=topic,
        )
    else:
        with _SESSIONS_LOCK:
            found = _SESSIONS.get(job)
        if found is None:
            raise RuntimeError(
                f"training job {job} has no session on this worker (it was restarted)"
            )
        session = found
    session.busy = True
    try:
        if session.run.device.type == "cuda":
            import torch

            torch.cuda.set_device(0)  # per thread: a segment may run on another executor thread
        reached = session.run.advance(
            until,
            checkpoint_every=checkpoint_every,
            on_step=session.report if session.ctx.is_main else None,
            should_stop=session.should_stop,
        )
        stopped = reached < until
        result: dict[str, Any] = {
            "step": reached,
            "saved_step": session.run.saved_step,
            "stopped": stopped,
            "signal": interrupt.requested(),
            "record": None,
        }
        if last and not stopped:
            record = session.run.finish()
            result["record"] = record if session.ctx.is_main else None
    except BaseException:
        session.busy = False
        _close_session(job)
        raise
    session.busy = False
    if last or stopped:
        _close_session(job)
    return result


def _segment_ends(start: int, end: int, every: int) -> list[int]:
    """The step each segment trains up to: every checkpoint after ``start``, then ``end``."""
    every = max(1, int(every))
    ends = [step for step in range((start // every + 1) * every, end, every) if step > start]
    return [*ends, end]


# --------------------------------------------------------------------------------------------
# Client side


def _choose_workers(
    client: Client, workers: int | Sequence[str] | None
) -> tuple[list[tuple[str, str]], bool]:
    """Return ``[(address, name), ...]`` in rank order and whether they are GPU workers."""
    info = live_workers(client)
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
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    """A submitted distributed job: its tasks, ranks and event stream."""

    client: Client
    ranks: list[tuple[str, str]]
    futures: list[Future]
    rank_of: dict[str, int]
    events: queue.SimpleQueue[dict[str, Any]]
    watch: _Watch
    on_report: Callable[[dict[str, Any]], None]
    workers: WorkerWatch

    def drain(self) -> None:
        while True:
            try:
                msg = self.events.get_nowait()
            except queue.Empty:
                return
            if msg.get("kind") == "checkpoint":
                self.watch.checkpoint = msg["path"]
                self.watch.checkpoint_step = int(msg["step"])
            elif msg.get("kind") == "progress":
                self.watch.step, self.watch.total = int(msg["step"]), int(msg["total"])
            self.on_report(msg)


def _backend(on_gpus: bool, backend: str | None) -> str:
    backend = backend or ("nccl" if on_gpus else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError("backend", f"{backend!r} is not nccl or gloo", "pick one of them")
    return backend


def _rendezvous(client: Client, first: str) -> str:
    host = get_address_host(first)
    port = client.run(_free_port, host, workers=[first])[first]
    return f"tcp://{host}:{port}"


def _reporter(
    on_progress: Callable[[Progress], None] | None, watch: _Watch
) -> Callable[[dict[str, Any]], None]:
    """Turn rank 0's messages into :class:`Progress` for ``on_progress`` (global rate)."""

    def report(msg: dict[str, Any]) -> None:
        if on_progress is None or msg.get("kind") != "progress":
            return
        if "samples" in msg:
            seconds = time.monotonic() - watch.started
            rate = msg["samples"] / seconds if seconds > 0 else 0.0
        else:
            rate = float(msg.get("samples_per_s", 0.0))
        on_progress(Progress(int(msg["step"]), int(msg["total"]), float(msg["loss"]), rate))

    return report


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
    backend = _backend(on_gpus, backend)
    addresses = [a for a, _ in chosen]
    init_method = _rendezvous(client, addresses[0])
    topic = f"srdvol-ddp-{uuid.uuid4().hex[:12]}"
    logger.info("distributed training on %d ranks via %s (%s)", len(chosen), init_method, backend)
    watch = _Watch()
    with _subscribed(client, topic) as events:
        futures = [
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
            for rank, address in enumerate(addresses)
        ]
        job = _Job(
            client,
            chosen,
            futures,
            {f.key: r for r, f in enumerate(futures)},
            events,
            watch,
            _reporter(on_progress, watch),
            WorkerWatch(client, addresses),
        )
        try:
            _supervise(job)
            return futures[0].result()
        finally:
            client.cancel([f for f in futures if not f.done()], force=True)


@contextlib.contextmanager
def _subscribed(client: Client, topic: str) -> Any:
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    try:
        yield events
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)


def _supervise(job: _Job) -> None:
    """Wait for every task, forwarding reports; raise on the first sign of a failed rank."""
    while True:
        job.drain()
        if all(f.status == "finished" for f in job.futures):
            job.drain()
            return
        lost = job.workers.lost()
        failed = [f for f in job.futures if f.status in ("error", "cancelled")]
        if lost or failed:
            _fail(job)
        time.sleep(_POLL)


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


def _fail(job: _Job) -> None:
    """Work out why the run stopped and raise the clearest error for it."""
    # The first symptom is often a peer's "connection closed"; give the scheduler a moment to
    # confirm the dead worker and the failing rank a moment to report its own error.
    deadline = time.monotonic() + CONFIRM_LOST + 5.0
    while True:
        lost = job.workers.lost(now=True)
        errors = {
            job.rank_of.get(f.key, 0): f.exception() for f in job.futures if f.status == "error"
        }
        own = [e for e in errors.values() if e is not None and not _is_communication_error(e)]
        if own and not lost:  # the training code failed on a rank: that error is the news
            raise own[0]
        suspects = job.workers.suspects
        settled = all(f.done() for f in job.futures) and not suspects
        if lost or settled or time.monotonic() > deadline:
            break
        time.sleep(_POLL)
    job.drain()
    watch, ranks = job.watch, job.ranks
    where = _where(watch)
    resume = (
        f"the last checkpoint is {watch.checkpoint} (step {watch.checkpoint_step}); rerun the "
        "same command to resume from it"
        if watch.checkpoint
        else "no checkpoint was written yet; rerun the command to start again"
    )
    if lost:
        names = ", ".join(
            f"{ranks[r][1]} ({ranks[r][0]}, rank {r})"
            for r, (address, _) in enumerate(ranks)
            if address in lost
        )
        raise TrainingInterruptedError(
            "distributed training",
            f"worker {names} stopped {where} (it died or lost contact with the scheduler, "
            "often from running out of memory)",
            f"{resume}, and check that worker's log and memory",
        )
    rank, exc = min(errors.items(), key=lambda item: item[0]) if errors else (0, None)
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


# --------------------------------------------------------------------------------------------
# srdvol training across workers (srdvol.training.loop's prepare_training on the client, a
# TrainingRun on every rank)


def _plan(
    client: Client,
    source: str | os.PathLike[str] | Any,
    model_path: str | os.PathLike[str],
    *,
    workers: int | Sequence[str] | None,
    **options: Any,
) -> tuple[TrainingPlan, list[tuple[str, str]], bool]:
    chosen, on_gpus = _choose_workers(client, workers)
    plan = prepare_training(source, model_path, world_size=len(chosen), **options)
    return plan, chosen, on_gpus


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
    :func:`srdvol.training.loop.prepare_training` (patch, sampling, steps, batch_size, lr, seed,
    network, resume, overwrite, level, axes, channel) for as many ranks as workers are chosen,
    so a distributed run accepts and refuses what :func:`srdvol.training.loop.train` does; like it,
    starting afresh with ``overwrite`` deletes a stale training state. The result also holds
    ``"workers"``, the chosen worker addresses in rank order (pop it before sending).
    """
    plan, chosen, _ = _plan(client, source, model_path, workers=workers, **options)
    return {
        "plan": plan.portable(),  # without the state's tensors: each rank reads the file
        "checkpoint_every": checkpoint_every,
        "stop_after": stop_after,
        "workers": [a for a, _ in chosen],
    }


def train_rank(
    ctx: DDPContext,
    *,
    plan: TrainingPlan,
    checkpoint_every: int,
    stop_after: int | None,
    on_finish: Callable[[Trainer], None] | None = None,
) -> Any:
    """One rank of a whole training in one task (for :func:`run_distributed`):
    :func:`srdvol.training.loop.run_training` with a DDP-wrapped network, this rank's patch stream
    and progress reports to the client.

    Every rank checkpoints at the same steps (the per-rank random streams are gathered); rank 0
    writes the training state and, at the end, the model file, and returns the model record.
    ``plan`` is the :class:`srdvol.training.loop.TrainingPlan` of :func:`plan_training`;
    ``on_finish`` is passed to :func:`~srdvol.training.loop.run_training` (called on every rank with
    its trainer when the loop ends). :func:`train_distributed` runs the same training as
    segment tasks instead.
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
    """A Trainer that reports every step to the client (rank 0)."""

    def __init__(self, *args: Any, ctx: DDPContext, samples_per_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        self.samples_per_step = samples_per_step
        self._first: int | None = None

    def step(self, batch: Any) -> float:
        if self._first is None:
            self._first = self.step_count  # after a resume: count this run's samples only
        loss = super().step(batch)
        samples = (self.step_count - self._first) * self.samples_per_step
        self.ctx.report(self.step_count, total=self.steps, loss=loss, samples=samples)
        return loss


def _start_step(plan: TrainingPlan) -> int:
    saved = plan.saved_state()
    return int(saved["trainer"]["step"]) if saved is not None else 0


def _run_segments(
    client: Client,
    plan: TrainingPlan,
    chosen: list[tuple[str, str]],
    *,
    backend: str,
    checkpoint_every: int,
    stop_after: int | None,
    timeout: float,
    on_report: Callable[[dict[str, Any]], None],
    watch: _Watch,
) -> Any:
    """Submit every rank's chain of segments, supervise them, return rank 0's record."""
    addresses = [a for a, _ in chosen]
    start = _start_step(plan)
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)
    ends = _segment_ends(start, end, checkpoint_every)
    portable = plan.portable()
    init_method = _rendezvous(client, addresses[0])
    job_id = uuid.uuid4().hex[:12]
    topic = f"srdvol-ddp-{job_id}"
    logger.info(
        "distributed training on %d ranks via %s (%s), %d segments",
        len(addresses),
        init_method,
        backend,
        len(ends),
    )
    watch.step, watch.total = start, plan.steps
    with _subscribed(client, topic) as events:
        futures: list[Future] = []
        rank_of: dict[str, int] = {}
        last: list[Future] = []
        for rank, address in enumerate(addresses):
            previous: Future | None = None
            for k, until in enumerate(ends):
                previous = client.submit(
                    _train_segment,
                    previous,
                    job=job_id,
                    segment=k,
                    until=until,
                    last=k == len(ends) - 1,
                    plan=portable,
                    checkpoint_every=checkpoint_every,
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
                    key=f"{SEGMENT_PREFIX}-{job_id}-r{rank}-s{k}",
                )
                futures.append(previous)
                rank_of[previous.key] = rank
            assert previous is not None
            last.append(previous)
        job = _Job(
            client,
            chosen,
            futures,
            rank_of,
            events,
            watch,
            on_report,
            WorkerWatch(client, addresses),
        )
        try:
            _supervise(job)
        except KeyboardInterrupt as exc:
            interrupt.keep(exc, _stop(job, job_id, last, plan))
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                alive = [a for a in addresses if a in live_workers(client)]
                client.run(_drop_session, job_id, workers=alive, on_error="ignore")
            raise
        finally:
            client.cancel([f for f in futures if not f.done()], force=True)
        return last[0].result()


def _stop(job: _Job, job_id: str, last: list[Future], plan: TrainingPlan) -> str:
    """After a Ctrl-C/SIGTERM: ask every rank to stop at its next step, wait for the saved
    state (a second signal cuts this short), say what was kept."""
    try:
        with interrupt.deferred():
            with contextlib.suppress(Exception):
                job.client.run(_request_stop, job_id, workers=[a for a, _ in job.ranks])
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline and not all(f.done() for f in last):
                job.drain()
                if job.workers.lost():
                    break
                time.sleep(_POLL)
            interrupt.clear()  # the request is handled here, not again on leaving the scope
    except KeyboardInterrupt:
        pass  # a second signal: stop waiting; say what is known to be saved
    job.drain()
    saved = [f.result() for f in last[:1] if f.status == "finished"]
    step = saved[0]["saved_step"] if saved else None
    if step is None and job.watch.checkpoint:
        step = job.watch.checkpoint_step
    elif step is None and plan.resume:
        step = _start_step(plan)
    return kept_text(step, plan.steps, plan.state_path)


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

    Options mean what they mean for :func:`srdvol.training.loop.train`, except ``batch_size``, which
    is per rank: the global batch is ``batch_size * ranks`` patches, whose gradients DDP
    averages. The learning rate is not scaled with the number of ranks: averaging keeps the
    gradient's size and only lowers its noise, and Adam already divides each step by the
    gradient's running RMS; with many ranks a larger ``lr`` (e.g. times sqrt(ranks)) may pay,
    which is left to the user. Each rank samples its own patches lazily from the store; rank 0
    writes ``MODEL.state`` every ``checkpoint_every`` steps and the model file at the end.
    ``source`` and ``model_path`` must be reachable under the same names from every worker (a
    shared file system or a URL).

    The training runs as one chain of segment tasks per rank, one segment per checkpoint
    interval, so the dashboard shows it advance.

    Parameters
    ----------
    client
        Client of the cluster (:func:`srdvol.dask.cluster.open_cluster`).
    workers
        Number of ranks, worker addresses, or ``None`` for every GPU worker (every worker
        when none has a GPU).
    backend, timeout
        See :func:`run_distributed`.
    progress
        Show the training's progress on the client (:mod:`srdvol.progress`: step of total,
        loss, global samples/s, ETA).
    on_progress
        Called with each :class:`Progress` report instead of the display.

    Returns
    -------
    ModelRecord
        The record written with the model.

    Raises
    ------
    TrainingInterruptedError
        If a worker dies or loses contact; the message names the last training state, and
        ``resume=True`` continues from it (with the same number of ranks).
    srdvol.interrupt.Interrupted
        On Ctrl-C or SIGTERM, after every rank saved the state (noted on the exception).
    """
    from srdvol import progress as progress_family

    plan, chosen, on_gpus = _plan(
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
        resume=resume,
        overwrite=overwrite,
        level=level,
        axes=axes,
        channel=channel,
        workers=workers,
    )
    if plan.sampling_reason and progress:
        print(f"sampling auto: {plan.sampling_reason}")  # as single-process training prints
    watch = _Watch()
    show = progress and on_progress is None
    with progress_family.training(
        plan.steps,
        done=_start_step(plan),
        samples_per_step=plan.batch_size * len(chosen),
        enabled=show,
    ) as bar:
        forward = _reporter(on_progress, watch)

        def on_report(msg: dict[str, Any]) -> None:
            forward(msg)
            if msg.get("kind") == "progress":
                bar.update(int(msg["step"]), total=int(msg["total"]), loss=float(msg["loss"]))
            elif msg.get("kind") == "checkpoint":
                bar.milestone()

        result = _run_segments(
            client,
            plan,
            chosen,
            backend=_backend(on_gpus, backend),
            checkpoint_every=checkpoint_every,
            stop_after=stop_after,
            timeout=timeout,
            on_report=on_report,
            watch=watch,
        )
    if result.get("stopped"):  # a worker was signalled on its own: the state is saved
        stopped = interrupt.Interrupted(result.get("signal") or signal.SIGTERM)
        interrupt.keep(stopped, kept_text(result["saved_step"], plan.steps, plan.state_path))
        raise stopped
    return result["record"]
