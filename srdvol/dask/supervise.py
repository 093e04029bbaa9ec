"""The client's side of a distributed job: choosing the ranks' workers, the rendezvous, the
event stream of progress reports, and watching the tasks until they end or fail.

A worker counts as dead only when the scheduler's own answers confirm it
(:class:`srdvol.dask.cluster.WorkerWatch`); a dead worker, or a rank whose collective failed
(:class:`~srdvol.training.collective.PeerLostError`), ends the run with a
:class:`~srdvol.errors.TrainingInterruptedError` naming the worker, the step reached and the last
checkpoint. An error raised by the job's own code (bad data, bad options) reaches the caller
unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, Future
from distributed.comm import get_address_host
from distributed.scheduler import KilledWorker

from srdvol.dask.workers import CONFIRM_LOST, WorkerWatch, live_workers
from srdvol.errors import ConfigError, TrainingInterruptedError, flag
from srdvol.training.collective import PeerLostError

__all__ = [
    "POLL",
    "Job",
    "StepReport",
    "Watch",
    "choose_backend",
    "choose_workers",
    "free_port",
    "rendezvous",
    "reporter",
    "subscribed",
    "supervise",
    "where",
]

#: Seconds between two looks at a job's tasks.
POLL = 0.25


@dataclass(frozen=True)
class StepReport:
    """One progress report of rank 0, as the client receives it.

    ``samples_per_s`` is the global rate: samples of all ranks since the job started over the
    client's wall time.
    """

    step: int
    total: int
    loss: float
    samples_per_s: float


def choose_workers(
    client: Client, workers: int | Sequence[str] | None
) -> tuple[list[tuple[str, str]], bool]:
    """Return ``[(address, name), ...]`` in rank order and whether they are GPU workers.

    ``workers``: the number of ranks (the first workers by name), explicit addresses, or
    ``None`` for every GPU worker (every worker when none has a GPU).
    """
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
                flag("workers"),
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
class Watch:
    """What the client knows about a running job, for progress and for failure messages."""

    step: int = 0
    total: int = 0
    checkpoint: str | None = None
    checkpoint_step: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class Job:
    """A submitted distributed job: its tasks, ranks and event stream."""

    client: Client
    ranks: list[tuple[str, str]]
    futures: list[Future]
    rank_of: dict[str, int]
    events: queue.SimpleQueue[dict[str, Any]]
    watch: Watch
    on_report: Callable[[dict[str, Any]], None]
    workers: WorkerWatch

    def drain(self) -> None:
        """Take every event that arrived and pass it on (checkpoints and steps are noted)."""
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


def choose_backend(on_gpus: bool, backend: str | None) -> str:
    backend = backend or ("nccl" if on_gpus else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError("backend", f"{backend!r} is not nccl or gloo", "pick one of them")
    return backend


def free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` right now (runs on the rank-0 worker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rendezvous(client: Client, first: str) -> str:
    host = get_address_host(first)
    port = client.run(free_port, host, workers=[first])[first]
    return f"tcp://{host}:{port}"


def reporter(
    on_progress: Callable[[StepReport], None] | None, watch: Watch
) -> Callable[[dict[str, Any]], None]:
    """Turn rank 0's messages into :class:`StepReport` for ``on_progress`` (global rate)."""

    def report(msg: dict[str, Any]) -> None:
        if on_progress is None or msg.get("kind") != "progress":
            return
        if "samples" in msg:
            seconds = time.monotonic() - watch.started
            rate = msg["samples"] / seconds if seconds > 0 else 0.0
        else:
            rate = float(msg.get("samples_per_s", 0.0))
        on_progress(StepReport(int(msg["step"]), int(msg["total"]), float(msg["loss"]), rate))

    return report


@contextlib.contextmanager
def subscribed(client: Client, topic: str) -> Iterator[queue.SimpleQueue[dict[str, Any]]]:
    """The events workers log on ``topic``, queued, while inside."""
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    try:
        yield events
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)


def supervise(job: Job) -> None:
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
        time.sleep(POLL)


def _peer_lost(exc: BaseException) -> bool:
    """True for errors that mean "a peer went away" rather than a bug or bad data: a failed
    collective (:class:`~srdvol.training.collective.PeerLostError`), a lost connection, a
    worker the scheduler gave up on."""
    return isinstance(exc, PeerLostError | TimeoutError | ConnectionError | KilledWorker)


def _fail(job: Job) -> None:
    """Work out why the run stopped and raise the clearest error for it."""
    # The first symptom is often a peer's "connection closed"; give the scheduler a moment to
    # confirm the dead worker and the failing rank a moment to report its own error.
    deadline = time.monotonic() + CONFIRM_LOST + 5.0
    while True:
        lost = job.workers.lost(now=True)
        errors = {
            job.rank_of.get(f.key, 0): f.exception() for f in job.futures if f.status == "error"
        }
        own = [e for e in errors.values() if e is not None and not _peer_lost(e)]
        if own and not lost:  # the training code failed on a rank: that error is the news
            raise own[0]
        suspects = job.workers.suspects
        settled = all(f.done() for f in job.futures) and not suspects
        if lost or settled or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    job.drain()
    watch, ranks = job.watch, job.ranks
    at = where(watch)
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
            f"worker {names} stopped {at} (it died or lost contact with the scheduler, "
            "often from running out of memory)",
            f"{resume}, and check that worker's log and memory",
        )
    rank, exc = min(errors.items(), key=lambda item: item[0]) if errors else (0, None)
    raise TrainingInterruptedError(
        "distributed training",
        f"rank {rank} on worker {ranks[rank][1]} ({ranks[rank][0]}) lost contact with the other "
        f"ranks {at} ({type(exc).__name__}: {str(exc).splitlines()[0] if exc else 'cancelled'})",
        f"{resume}, and check the network between the workers",
    )


def where(watch: Watch) -> str:
    if watch.total:
        return f"at step {watch.step} of {watch.total}"
    return "before the first step" if watch.step == 0 else f"at step {watch.step}"
