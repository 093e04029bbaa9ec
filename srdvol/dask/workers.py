"""The workers: which are alive (asked of the scheduler itself), and the plugins srdvol installs
in each worker process (torch threads, graceful signals, quiet task errors, the model).

Which workers are alive is always asked of the scheduler itself (:func:`live_workers`), never read
from ``Client.scheduler_info()``: that returns the client's shared cached identity, which the
client's own periodic refresh (every 2 s, without the worker list) can overwrite with an empty
``workers`` dict between the fetch and the read. A worker counts as gone only when two direct
answers some seconds apart both lack it (:class:`WorkerWatch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from distributed import Client, WorkerPlugin

__all__ = [
    "CONFIRM_LOST",
    "STOP_WAIT",
    "THREAD_VARS",
    "CloseStoreSessions",
    "ModelPlugin",
    "QuietTaskErrors",
    "SignalPlugin",
    "TorchThreadsPlugin",
    "WorkerWatch",
    "live_workers",
    "lost_workers_reported",
]

logger = logging.getLogger(__name__)

#: Seconds a worker must stay absent from the scheduler's answers before it counts as gone.
CONFIRM_LOST = 3.0
#: Environment variables that size the BLAS/OpenMP pools numpy and torch start with.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def live_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Return ``{address: identity}`` of the workers the scheduler has right now.

    Asks the scheduler directly (one ``identity`` call), never the client's cached
    ``scheduler_info()``, which its periodic refresh can empty at any moment. Every srdvol
    question "which workers are alive, how many threads" goes through here.

    Parameters
    ----------
    client
        A synchronous ``distributed.Client``.
    """
    info = client.sync(client.scheduler.identity, n_workers=-1)
    return dict(info.get("workers") or {})


class WorkerWatch:
    """Tell which of some workers are gone, on confirmed evidence only.

    A worker is *lost* once two direct answers of the scheduler (:func:`live_workers`) at least
    ``confirm`` seconds apart both lack it; one missing sighting is only a suspicion (a worker
    the Nanny restarts comes back under a new address, so the old one never reappears). The
    scheduler is asked at most every ``every`` seconds; an answer that cannot be had (the
    scheduler is busy or unreachable) decides nothing.

    Parameters
    ----------
    client
        Client of the cluster.
    addresses
        The workers to watch.
    confirm, every
        Seconds between the sighting and its confirmation; least seconds between two questions.
    """

    def __init__(
        self,
        client: Client,
        addresses: Iterable[str],
        *,
        confirm: float = CONFIRM_LOST,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.addresses = list(addresses)
        self.confirm = float(confirm)
        self.every = float(every)
        self._clock = clock
        self._missing_since: dict[str, float] = {}
        self._asked = -float("inf")
        self._lost: list[str] = []

    def lost(self, *, now: bool = False) -> list[str]:
        """Workers confirmed gone (asks the scheduler when ``every`` seconds have passed, or
        at once when ``now``)."""
        moment = self._clock()
        if not now and moment - self._asked < self.every:
            return list(self._lost)
        self._asked = moment
        try:
            alive = live_workers(self.client)
        except (OSError, TimeoutError) as exc:
            logger.debug("the scheduler did not say which workers are alive: %s", exc)
            return list(self._lost)
        for address in self.addresses:
            if address in alive:
                self._missing_since.pop(address, None)
            else:
                self._missing_since.setdefault(address, moment)
        self._lost = [
            a
            for a in self.addresses
            if a in self._missing_since and moment - self._missing_since[a] >= self.confirm
        ]
        return list(self._lost)

    @property
    def suspects(self) -> list[str]:
        """Workers missing from the latest answer (confirmed or not)."""
        return [a for a in self.addresses if a in self._missing_since]


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    # inter-op threads can only be set once per process, before any parallel work
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)


class TorchThreadsPlugin(WorkerPlugin):
    """Worker plugin that sets torch's intra-op thread count when a worker starts.

    Parameters
    ----------
    threads
        Threads torch may use inside this worker process.
    """

    name = "srdvol-torch-threads"
    idempotent = True

    def __init__(self, threads: int) -> None:
        self.threads = int(threads)

    def setup(self, worker: Any) -> None:
        """Set the thread count in the worker process (called by distributed)."""
        for var in THREAD_VARS:
            os.environ[var] = str(self.threads)
        _set_torch_threads(self.threads)

    def teardown(self, worker: Any) -> None:
        """Nothing to release."""


class _CancelledOnClose(logging.Filter):
    """Drop distributed's warning that a task still running was cancelled by the worker's
    close (what an interrupted run does on purpose); other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Async instruction for") and text.endswith("CancelledError"))


_CANCELLED_ON_CLOSE = _CancelledOnClose()


#: Seconds a closing worker waits for the block in its model to park (one batch at most).
STOP_WAIT = 20.0


class SignalPlugin(WorkerPlugin):
    """Worker plugin: SIGINT and SIGTERM only ask a running training to stop and save.

    Ctrl-C in a terminal signals the whole process group, srdvol's local worker processes
    included. Without this plugin they die at once with a traceback (and a distributed training
    loses the steps since its last checkpoint); with it they record the request
    (:mod:`srdvol.interrupt`), training ranks stop at the next step and save their state, and
    the worker stays up until the client that started it shuts it down (quietly: the warning
    about the task its close cancelled is dropped).
    """

    name = "srdvol-signals"
    idempotent = True

    def setup(self, worker: Any) -> None:
        """Install the recording handler (runs in the worker process's main thread)."""
        from srdvol import interrupt

        interrupt.install(raise_now=False)
        logging.getLogger("distributed.worker.state_machine").addFilter(_CANCELLED_ON_CLOSE)

    def teardown(self, worker: Any) -> None:
        """Park the block in the model at its next batch before the worker process exits
        (:func:`srdvol.predict.block.stop_blocks`); a worker in the client's own process
        leaves them be (that process goes on)."""
        import multiprocessing

        if multiprocessing.parent_process() is None:
            return
        from srdvol.predict.block import stop_blocks

        stop_blocks(timeout=STOP_WAIT)


class ModelPlugin(WorkerPlugin):
    """Worker plugin that loads a model file once per worker, before any task needs it.

    The plugin fills the per-process model cache (:func:`srdvol.predict.predictors.load_cached`),
    so tasks that run a :class:`~srdvol.predict.predictors.ModelPredictor` for the same file and
    device find the network already loaded. Only the path travels to the workers; each worker
    reads the file itself, so the path must be visible to every worker (a shared file system on
    a cluster).

    Parameters
    ----------
    model_path
        Path of the srdvol model file.
    device
        ``"auto"`` (the worker's GPU when it has one, else CPU), ``"cpu"`` or ``"cuda"``; use
        the same value as the predictors the tasks build.
    threads
        If given, torch's thread count in the worker.

    Examples
    --------
    >>> client.register_plugin(ModelPlugin("model.srdvol"))  # doctest: +SKIP
    """

    name = "srdvol-model"
    idempotent = False

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.device = device
        self.threads = threads

    def setup(self, worker: Any) -> None:
        """Load the model into this worker process's cache (called by distributed)."""
        if self.threads is not None:
            _set_torch_threads(self.threads)
        from srdvol.predict.predictors import load_cached

        load_cached(self.model_path, device=self.device)

    def teardown(self, worker: Any) -> None:
        """Nothing to release: the cache lives as long as the worker process."""


class QuietTaskErrors(WorkerPlugin):
    """Worker plugin: drop distributed's "Compute Failed" log of a failed task.

    srdvol receives every task error on the client and reports it in one sentence (with the
    worker's traceback under ``--debug``), so the worker's own multi-line log of the same error
    only buries that sentence. Other worker logs (memory, lost connections) are kept.
    """

    name = "srdvol-quiet-task-errors"
    idempotent = True

    def setup(self, worker: Any) -> None:
        """Install the filter in the worker process (called by distributed)."""
        logging.getLogger("distributed.worker").addFilter(_drop_compute_failed)

    def teardown(self, worker: Any) -> None:
        """Nothing to release."""


def _drop_compute_failed(record: Any) -> bool:
    return not str(record.msg).startswith("Compute Failed")


class CloseStoreSessions(WorkerPlugin):
    """Worker plugin: close the HTTP sessions of remote stores (``s3://``) as a worker shuts
    down, which would otherwise print aiohttp's "Unclosed client session" on stderr."""

    name = "srdvol-close-store-sessions"
    idempotent = True

    def setup(self, worker: Any) -> None:
        """Nothing to set up."""

    def teardown(self, worker: Any) -> None:
        """Close the sessions (called by distributed while the worker closes)."""
        from srdvol.ngff.remote import close_sessions

        close_sessions()


@contextlib.contextmanager
def lost_workers_reported(
    client: Client, on_lost: Callable[[str, int], None], *, ours: str | None = None
) -> Iterator[None]:
    """Inside: call ``on_lost(address, tasks)`` once for every worker the scheduler loses
    without being asked to (killed, crashed, stopped answering), with the number of tasks it was
    running. distributed reruns those elsewhere and the job goes on; a user waiting for it
    should know why it takes longer. Workers retired on purpose (``expected``) are not reported.

    ``ours``: on a scheduler shared with other clients, report only workers that ran or held
    tasks whose key names contain this (srdvol's ``"srdvol-"``), counting only those; ``None``
    reports every worker (a cluster of our own, whose idle workers matter too).
    """
    said: set[str] = set()

    def on_event(event: Any) -> None:
        msg = event[1]
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        address = str(msg.get("worker", "?"))
        if msg.get("expected") or address in said:
            return
        running = list(msg.get("processing-tasks") or ())
        if ours is not None:
            held = list(msg.get("lost-computed-tasks") or ())
            if not any(ours in _key_name(key) for key in running + held):
                return
            running = [key for key in running if ours in _key_name(key)]
        said.add(address)
        on_lost(address, len(running))

    client.subscribe_topic("all", on_event)  # the scheduler's own event stream
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic("all")


def _key_name(key: Any) -> str:
    """A task key's name: the key itself, or the first part of a tuple key."""
    return str(key[0] if isinstance(key, tuple) and key else key)
