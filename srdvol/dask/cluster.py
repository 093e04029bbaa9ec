"""Dask clusters for srdvol: one worker per GPU, CPU workers otherwise, or an existing scheduler.

srdvol either attaches to a scheduler the user already runs (dask-jobqueue, Kubernetes, a
``dask scheduler`` started by hand) or starts a local :class:`distributed.SpecCluster`:

- one :class:`distributed.Nanny` worker process per GPU, pinned with its own
  ``CUDA_VISIBLE_DEVICES`` and advertising ``resources={"GPU": 1}`` (dask-cuda is not used: its
  releases pin other dask versions);
- or, without GPUs, a few CPU worker processes whose torch thread count is set explicitly
  (a Nanny worker otherwise runs torch with one thread, because distributed sets
  ``OMP_NUM_THREADS=1`` before spawning it).

A model is loaded once per worker by :class:`ModelPlugin`; its weights travel as a file path, never
through the scheduler.

Which workers are alive is always asked of the scheduler itself (:func:`live_workers`), never read
from ``Client.scheduler_info()``: that returns the client's shared cached identity, which the
client's own periodic refresh (every 2 s, without the worker list) can overwrite with an empty
``workers`` dict between the fetch and the read. A worker counts as gone only when two direct
answers some seconds apart both lack it (:class:`WorkerWatch`).

A local cluster listens on 127.0.0.1 (scheduler, workers and dashboard) unless the caller asks
for another address.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin

from srdvol.app.config import DEFAULT_DASHBOARD_ADDRESS
from srdvol.errors import ClusterError, ConfigError, GPUUnavailableError

__all__ = [
    "DEFAULT_DASHBOARD_ADDRESS",
    "LOCAL_HOST",
    "ModelPlugin",
    "SignalPlugin",
    "TorchThreadsPlugin",
    "WorkerWatch",
    "check_addresses",
    "cpu_worker_spec",
    "dashboard_link",
    "gpu_worker_spec",
    "live_workers",
    "open_cluster",
    "parse_gpus",
    "resolve_gpus",
    "visible_gpus",
]

logger = logging.getLogger(__name__)

#: What ``gpus=`` accepts: ``None``/"auto" (GPUs when present), "all", "none", or a list of
#: GPUs, each a position in :func:`visible_gpus` (int) or a device id as listed there (str).
GPUChoice = Literal["auto", "all", "none"] | Sequence[int | str] | None

#: How CUDA_VISIBLE_DEVICES names a device other than by index: a GPU UUID or a MIG instance.
_DEVICE_PREFIXES = ("GPU-", "MIG-")

# Environment variables that size the BLAS/OpenMP pools numpy and torch start with.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PRE_SPAWN_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
#: Interface of a local cluster's scheduler and workers: this machine only.
LOCAL_HOST = "127.0.0.1"
#: Seconds a worker must stay absent from the scheduler's answers before it counts as gone.
CONFIRM_LOST = 3.0


# --------------------------------------------------------------------------------------------
# Which workers are alive


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


# --------------------------------------------------------------------------------------------
# GPUs


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
        Device identifiers in visible order; a position in this list is what ``--gpus 0,1``
        means, the string is what a worker's ``CUDA_VISIBLE_DEVICES`` is set to.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(_count_gpus())]
    ids: list[str] = []
    for item in env.split(","):
        item = item.strip()
        if not (item.isdigit() or item.startswith(_DEVICE_PREFIXES)):
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


def parse_gpus(text: str | None) -> GPUChoice:
    """Read the ``--gpus`` option: ``auto``, ``all``, ``none`` or a comma-separated list.

    Each list entry is a position in the visible list (``0,1``: the first two GPUs that
    ``CUDA_VISIBLE_DEVICES`` shows, as CUDA numbers them inside the process) or a device id as
    ``CUDA_VISIBLE_DEVICES`` writes it (``GPU-<uuid>``, ``MIG-<uuid>``); :func:`resolve_gpus`
    checks that they are visible.

    Returns
    -------
    None, str or list of int and str
        ``None`` for no text, the keyword, or the entries (positions as int, ids as str).

    Raises
    ------
    ConfigError
        If the text is none of these.
    """
    if text is None:
        return None
    value = text.strip()
    if value.lower() in ("auto", "all", "none"):
        return value.lower()  # type: ignore[return-value]
    entries: list[int | str] = []
    for part in (p.strip() for p in value.split(",")):
        if part.isdigit():
            entries.append(int(part))
        elif part.startswith(_DEVICE_PREFIXES) and len(part) > 4:
            entries.append(part)
        else:
            entries = []
            break
    if not entries:
        raise ConfigError(
            "--gpus",
            f"{text!r} is not a GPU choice",
            "give auto, all, none, positions in the visible GPU list such as 0,1, or device "
            "ids such as GPU-<uuid>",
        )
    return entries


def resolve_gpus(gpus: GPUChoice) -> list[str]:
    """Turn a ``gpus=`` choice into the devices to start workers on (``[]`` for CPU).

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
        If the choice is not one :func:`parse_gpus` returns, or names one GPU twice.
    """
    present = visible_gpus()
    if gpus is None or gpus == "auto":
        return present
    if gpus == "none":
        return []
    if gpus == "all":
        if not present:
            raise GPUUnavailableError(
                "--gpus all",
                "no GPU is visible on this machine (torch and nvidia-smi find none, or "
                "CUDA_VISIBLE_DEVICES hides them)",
                "run without --gpus to use CPU workers, or on a machine with a GPU",
            )
        return present
    if isinstance(gpus, str):
        raise ConfigError("--gpus", f"{gpus!r} is not a GPU choice", "give auto, all, none or ids")
    wanted = list(gpus)
    subject = f"--gpus {','.join(map(str, wanted))}"
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
                "CUDA_VISIBLE_DEVICES writes them, or run without --gpus to use CPU workers",
            )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(subject, "the list names one GPU twice", "give each GPU once")
    return chosen


def _describe_visible(present: Sequence[str]) -> str:
    if not present:
        return "no GPU is visible"
    listed = ", ".join(f"{i}: {gpu}" for i, gpu in enumerate(present))
    return f"visible GPUs by position: {listed}"


# --------------------------------------------------------------------------------------------
# Worker plugins


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
        for var in _THREAD_VARS:
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
        """Nothing to release."""


class ModelPlugin(WorkerPlugin):
    """Worker plugin that loads a model file once per worker, before any task needs it.

    The plugin fills the per-process model cache of :mod:`srdvol.predict.predictors`
    (:func:`srdvol.predict.predictors.load_cached`), so tasks that run a
    :class:`srdvol.predict.predictors.ModelPredictor` for the same file and device find the network already
    loaded. Only the path travels to the workers; each worker reads the file itself, so the path
    must be visible to every worker (a shared file system on a cluster).

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


# --------------------------------------------------------------------------------------------
# Cluster specs


def _default_memory_limit(n_workers: int) -> int:
    import psutil

    # SpecCluster's "auto" sizes a 1-thread worker as 1/ncores of RAM, far too little for a model
    # worker; share the machine between the workers instead, as LocalCluster does.
    return int(psutil.virtual_memory().total // max(1, n_workers))


def gpu_worker_spec(
    gpu_ids: Sequence[str | int],
    *,
    host: str = LOCAL_HOST,
    memory_limit: int | str | None = None,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Build a :class:`distributed.SpecCluster` worker spec with one process per GPU.

    Each worker is a :class:`distributed.Nanny` named ``gpu-<id>`` whose process sees only its
    own device (``CUDA_VISIBLE_DEVICES=<id>``, so the model uses ``cuda:0`` there), advertises
    ``resources={"GPU": 1}`` and runs one task at a time. Only environment variables pin the
    device: nothing initialises CUDA when the worker starts.

    Parameters
    ----------
    gpu_ids
        Devices as ``CUDA_VISIBLE_DEVICES`` names them (indices, ``GPU-<uuid>`` or MIG ids,
        as :func:`resolve_gpus` returns them), one worker each.
    host
        Interface the workers listen on.
    memory_limit
        Host memory per worker (bytes or a string like ``"16GB"``); default: RAM / workers.
    threads
        CPU threads for torch and BLAS in each worker (data loading, normalisation); default:
        CPU cores / workers.

    Returns
    -------
    dict
        ``{name: {"cls": Nanny, "options": {...}}}``, the ``workers=`` argument of SpecCluster.

    Raises
    ------
    ConfigError
        If a device is given twice or an id is empty.
    """
    ids = [str(i).strip() for i in gpu_ids]
    if len(set(ids)) != len(ids) or not all(ids):
        raise ConfigError("--gpus", f"GPU ids {ids} repeat a device", "give each GPU once")
    n = max(1, len(ids))
    cpu_threads = threads or max(1, (os.cpu_count() or 1) // n)
    limit = _default_memory_limit(n) if memory_limit is None else memory_limit
    spec: dict[str, dict[str, Any]] = {}
    for gpu in ids:
        env = {"CUDA_VISIBLE_DEVICES": gpu}
        env.update({var: str(cpu_threads) for var in _THREAD_VARS})
        # Legacy MIG ids hold slashes ("MIG-GPU-<uuid>/1/0"); keep worker names plain.
        spec[f"gpu-{gpu.replace('/', '_')}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "env": env,
                "host": host,
                "memory_limit": limit,
                "plugins": (TorchThreadsPlugin(cpu_threads), SignalPlugin()),
            },
        }
    return spec


def cpu_worker_spec(
    n_workers: int,
    *,
    threads: int | None = None,
    host: str = LOCAL_HOST,
    memory_limit: int | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Build a :class:`distributed.SpecCluster` worker spec of CPU worker processes.

    Each worker (``cpu-<i>``) runs one task at a time and lets torch and BLAS use ``threads``
    threads: a model task parallelises inside torch, not across dask threads.

    Parameters
    ----------
    n_workers
        Number of worker processes.
    threads
        torch/BLAS threads per worker; default: CPU cores / workers.
    host
        Interface the workers listen on.
    memory_limit
        Memory per worker (bytes or a string like ``"8GB"``); default: RAM / workers.
    """
    if n_workers < 1:
        raise ConfigError("--workers", f"{n_workers} workers is not possible", "give 1 or more")
    if threads is not None and threads < 1:
        raise ConfigError("--threads", f"{threads} threads is not possible", "give 1 or more")
    per_worker = threads or max(1, (os.cpu_count() or 1) // n_workers)
    limit = _default_memory_limit(n_workers) if memory_limit is None else memory_limit
    env = {var: str(per_worker) for var in _THREAD_VARS}
    return {
        f"cpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": dict(env),
                "host": host,
                "memory_limit": limit,
                "plugins": (TorchThreadsPlugin(per_worker), SignalPlugin()),
            },
        }
        for i in range(n_workers)
    }


def _scheduler_spec(host: str, dashboard_address: str | None) -> dict[str, Any]:
    # The HTTP server (health, metrics) starts even without a dashboard: give it a free port then.
    options: dict[str, Any] = {
        "host": host,
        "dashboard": dashboard_address is not None,
        "dashboard_address": ":0" if dashboard_address is None else dashboard_address,
    }
    return {"cls": Scheduler, "options": options}


# --------------------------------------------------------------------------------------------
# Addresses


def check_addresses(*, scheduler: str | None = None, dashboard_address: str | None = None) -> None:
    """Refuse a ``--scheduler`` or ``--dashboard-address`` that is not an address, up front.

    Without this, distributed blames memory and ports for a bad dashboard address, and a
    scheduler address without a port leaves a half-made client that waits 20 s as it is
    collected.

    Parameters
    ----------
    scheduler
        ``[PROTOCOL://]HOST:PORT`` of a running scheduler, or a scheduler file (``*.json``).
    dashboard_address
        ``[HOST]:PORT`` for the local dashboard (port 0: any free port).

    Raises
    ------
    ConfigError
        Naming the option, with an example of a valid value.
    """
    from distributed.comm import parse_address, parse_host_port

    if scheduler is not None and not (scheduler.endswith(".json") and "://" not in scheduler):
        try:
            protocol, location = parse_address(scheduler)
            if protocol != "inproc":
                _, port = parse_host_port(location)
                _check_port(port)
        except ValueError as exc:
            raise ConfigError(
                "--scheduler",
                f"{scheduler!r} is not a scheduler address ({exc})",
                "give it as tcp://HOST:PORT (for example tcp://10.0.0.5:8786) or the path of a "
                "scheduler file ending in .json",
            ) from None
    if dashboard_address is not None:
        _check_dashboard(dashboard_address)


def _check_port(port: int) -> None:
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is not between 0 and 65535")


def _check_dashboard(text: str) -> None:
    import socket

    from distributed.comm import parse_host_port

    fix = "give it as [HOST]:PORT, for example :8787, 127.0.0.1:8787, or :0 for any free port"
    try:
        if "://" in text:
            raise ValueError("a dashboard address has no protocol")
        host, port = parse_host_port(text)
        _check_port(port)
    except ValueError as exc:
        raise ConfigError(
            "--dashboard-address", f"{text!r} is not an address ({exc})", fix
        ) from None
    if host:
        try:
            socket.getaddrinfo(host, port)
        except OSError as exc:
            raise ConfigError(
                "--dashboard-address",
                f"the host {host!r} of {text!r} is not known on this machine ({exc.strerror})",
                fix,
            ) from None


# --------------------------------------------------------------------------------------------
# Opening a cluster


def dashboard_link(client: Client) -> str | None:
    """Return the dashboard URL of the client's scheduler (``.../status``), or ``None``.

    ``None`` means the scheduler serves no dashboard (started with ``dashboard_address=None``,
    or bokeh is not installed where the scheduler runs).
    """
    try:
        served = bool(client.run_on_scheduler(_serves_dashboard))
    except Exception:  # a scheduler that refuses run_on_scheduler: trust its own report
        logger.debug("could not ask the scheduler about its dashboard", exc_info=True)
        served = "dashboard" in client.scheduler_info().get("services", {})
    return str(client.dashboard_link) if served else None


class _ClosedPageNoise(logging.Filter):
    """Drop tornado's report of bokeh's AssertionError when a dashboard page is closed.

    Closing a browser tab on the dashboard makes bokeh's websocket ``on_close`` read the
    connection's session after it was detached; tornado then logs "Uncaught exception GET
    /status/ws" with a 30-line traceback on ``tornado.application`` at ERROR, which dask's
    logging configuration prints into the user's terminal. Nothing is wrong (the page is gone);
    every other record of that logger passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, AssertionError):
            return True
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "on_close" and code.co_filename.replace(os.sep, "/").endswith(
                "bokeh/server/views/ws.py"
            ):
                return False
            tb = tb.tb_next
        return True


_NOISE_FILTER = _ClosedPageNoise()


def quiet_dashboard_noise() -> None:
    """Keep closed dashboard pages from printing a traceback (see :class:`_ClosedPageNoise`).

    The dashboard of a local cluster runs in this process, so the filter goes on this
    process's ``tornado.application`` logger; adding it twice is harmless.
    """
    logging.getLogger("tornado.application").addFilter(_NOISE_FILTER)


def _serves_dashboard(dask_scheduler: Any) -> bool:
    # The scheduler always runs an HTTP server (health, metrics); the bokeh dashboard is an
    # application added to it only when enabled and bokeh is importable.
    return bool(getattr(dask_scheduler.http_application, "applications", None))


@contextlib.contextmanager
def open_cluster(
    *,
    scheduler: str | None = None,
    gpus: GPUChoice = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    dashboard_address: str | None = DEFAULT_DASHBOARD_ADDRESS,
    memory_limit: int | str | None = None,
    host: str = LOCAL_HOST,
    timeout: float = 10.0,
) -> Iterator[Client]:
    """Connect to a Dask scheduler or start a local cluster; yield a client and clean up.

    Parameters
    ----------
    scheduler
        Address of a running scheduler (``tcp://host:8786``) or a scheduler file (``*.json``)
        to attach to. ``None`` starts a local cluster and closes it on exit.
    gpus
        Local cluster only: ``None``/``"auto"`` (one worker per visible GPU, CPU workers when
        there is none), ``"all"`` (GPUs required), ``"none"`` (CPU workers) or device ids.
    workers
        Number of workers: CPU worker processes (default: up to 4, one per 2 cores), or the
        first ``workers`` of the chosen GPUs.
    threads_per_worker
        torch/BLAS threads in each worker (default: CPU cores / workers).
    dashboard_address
        Where the local scheduler serves its dashboard: :data:`DEFAULT_DASHBOARD_ADDRESS`
        (127.0.0.1:8787, this machine only), ``"127.0.0.1:0"`` for any free port,
        ``"0.0.0.0:8787"`` for every interface, ``None`` for none. A bare port (``":8787"``)
        means every interface, as in distributed.
    memory_limit
        Memory per worker (bytes or ``"16GB"``); default: RAM / workers.
    host
        Interface of the local scheduler and workers (loopback by default).
    timeout
        Seconds to wait when connecting to ``scheduler``.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ConfigError
        If ``scheduler`` or ``dashboard_address`` is not an address (:func:`check_addresses`).
    ClusterError
        If ``scheduler`` cannot be reached in ``timeout`` seconds or the local cluster fails.
    GPUUnavailableError
        If GPUs are requested and not visible.
    """
    check_addresses(scheduler=scheduler, dashboard_address=dashboard_address)
    if scheduler is not None:
        with _attach(scheduler, timeout=timeout) as client:
            yield client
        return
    spec = _local_spec(gpus, workers, threads_per_worker, memory_limit, host)
    try:
        # distributed sets MALLOC_TRIM_THRESHOLD_=65536 before spawning a worker. Setting it at
        # all turns off glibc's adaptive mmap threshold, so every large torch tensor is mmap'ed
        # and page-faulted afresh: measured 0.17 vs 0.08 s per CPU training step of the default
        # network (any value, 64 KiB or 128 MiB). None leaves glibc's defaults in the workers.
        with dask.config.set({PRE_SPAWN_TRIM: None}):
            cluster = SpecCluster(
                workers=spec,
                scheduler=_scheduler_spec(host, dashboard_address),
                silence_logs=logging.ERROR,
                name="srdvol",
            )
    except Exception as exc:  # startup errors of distributed have no single type
        raise ClusterError(
            "local Dask cluster",
            f"the worker processes did not start ({type(exc).__name__}: {exc})",
            "check free memory and ports, or pass --scheduler to use an existing cluster",
        ) from exc
    quiet_dashboard_noise()
    try:
        with Client(cluster) as client:
            link = dashboard_link(client)
            logger.info("Dask dashboard: %s", link or "disabled")
            yield client
    finally:
        cluster.close()


def _local_spec(
    gpus: GPUChoice,
    workers: int | None,
    threads: int | None,
    memory_limit: int | str | None,
    host: str,
) -> dict[str, dict[str, Any]]:
    if workers is not None and workers < 1:
        raise ConfigError("--workers", f"{workers} workers is not possible", "give 1 or more")
    ids = resolve_gpus(gpus)
    if ids:
        if workers is not None:
            if workers > len(ids):
                raise GPUUnavailableError(
                    "--workers",
                    f"{workers} GPU workers asked for but only {len(ids)} GPU(s) chosen",
                    "lower --workers or choose more GPUs with --gpus",
                )
            ids = ids[:workers]
        return gpu_worker_spec(ids, host=host, memory_limit=memory_limit, threads=threads)
    cores = os.cpu_count() or 1
    n = workers or max(1, min(4, cores // 2))
    return cpu_worker_spec(n, threads=threads, host=host, memory_limit=memory_limit)


@contextlib.contextmanager
def _attach(scheduler: str, *, timeout: float) -> Iterator[Client]:
    kwargs: dict[str, Any]
    if scheduler.endswith(".json") and "://" not in scheduler:
        if not os.path.exists(scheduler):
            raise ClusterError(
                scheduler,
                "the scheduler file does not exist",
                "start the scheduler with --scheduler-file first, or give its tcp:// address",
            )
        kwargs = {"scheduler_file": scheduler}
    else:
        kwargs = {"address": scheduler}
    try:
        client = Client(timeout=timeout, set_as_default=False, **kwargs)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(
            scheduler,
            f"no Dask scheduler answered within {timeout:g} s ({type(exc).__name__})",
            "check the address and that the scheduler is running, or leave out --scheduler "
            "to start a local cluster",
        ) from exc
    try:
        # Not the process-wide default (the caller may have its own), but current inside this
        # context, so dask/distributed helpers that look for "the" client find this one.
        with client.as_current():
            yield client
    finally:
        client.close()
