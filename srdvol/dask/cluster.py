"""Dask clusters for srdvol: one worker per GPU, CPU workers otherwise, or an existing scheduler.

srdvol either attaches to a scheduler the user already runs (dask-jobqueue, Kubernetes, a
``dask scheduler`` started by hand) or starts a local :class:`distributed.SpecCluster`:

- one :class:`distributed.Nanny` worker process per GPU, pinned with its own
  ``CUDA_VISIBLE_DEVICES`` and advertising ``resources={"GPU": 1}`` (dask-cuda is not used: its
  releases pin other dask versions);
- or, without GPUs, a few CPU worker processes whose torch thread count is set explicitly
  (a Nanny worker otherwise runs torch with one thread, because distributed sets
  ``OMP_NUM_THREADS=1`` before spawning it).

A local cluster listens on 127.0.0.1 (scheduler, workers and dashboard) unless the caller asks
for another address. Workers, their plugins and which of them are alive:
:mod:`srdvol.dask.workers`; GPUs: :mod:`srdvol.dask.gpus`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import dask
from distributed import Client, Nanny, Scheduler, SpecCluster

from srdvol.dask.gpus import resolve_gpus
from srdvol.dask.workers import THREAD_VARS, SignalPlugin, TorchThreadsPlugin
from srdvol.errors import ClusterError, ConfigError, GPUUnavailableError, flag
from srdvol.options import ClusterOptions, merge, refuse_unknown

__all__ = [
    "LOCAL_HOST",
    "check_addresses",
    "cpu_worker_spec",
    "dashboard_link",
    "gpu_worker_spec",
    "open_cluster",
    "quiet_dashboard_noise",
]

logger = logging.getLogger(__name__)

PRE_SPAWN_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
#: Interface of a local cluster's scheduler and workers: this machine only.
LOCAL_HOST = "127.0.0.1"


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
        raise ConfigError(flag("gpus"), f"GPU ids {ids} repeat a device", "give each GPU once")
    n = max(1, len(ids))
    cpu_threads = threads or max(1, (os.cpu_count() or 1) // n)
    limit = _default_memory_limit(n) if memory_limit is None else memory_limit
    spec: dict[str, dict[str, Any]] = {}
    for gpu in ids:
        env = {"CUDA_VISIBLE_DEVICES": gpu}
        env.update({var: str(cpu_threads) for var in THREAD_VARS})
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
        raise ConfigError(flag("workers"), f"{n_workers} workers is not possible", "give 1 or more")
    if threads is not None and threads < 1:
        raise ConfigError(
            flag("threads_per_worker"), f"{threads} threads is not possible", "give 1 or more"
        )
    per_worker = threads or max(1, (os.cpu_count() or 1) // n_workers)
    limit = _default_memory_limit(n_workers) if memory_limit is None else memory_limit
    env = {var: str(per_worker) for var in THREAD_VARS}
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


def check_addresses(*, scheduler: str | None = None, dashboard_address: str | None = None) -> None:
    """Refuse a scheduler or dashboard address that is not an address, up front.

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
                flag("scheduler"),
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
            flag("dashboard_address"), f"{text!r} is not an address ({exc})", fix
        ) from None
    if host:
        try:
            socket.getaddrinfo(host, port)
        except OSError as exc:
            raise ConfigError(
                flag("dashboard_address"),
                f"the host {host!r} of {text!r} is not known on this machine ({exc.strerror})",
                fix,
            ) from None


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
    options: ClusterOptions | None = None,
    *,
    memory_limit: int | str | None = None,
    host: str = LOCAL_HOST,
    timeout: float = 10.0,
    **changes: Any,
) -> Iterator[Client]:
    """Connect to a Dask scheduler or start a local cluster; yield a client and clean up.

    Parameters
    ----------
    options
        :class:`~srdvol.options.ClusterOptions`: ``scheduler`` (address of a running
        scheduler, ``tcp://host:8786``, or a scheduler file ``*.json``, to attach to; ``None``
        starts a local cluster and closes it on exit), ``gpus`` (local cluster: auto, all, none
        or GPUs by position or id), ``workers`` (CPU worker processes, default up to 4, one per
        2 cores; or the first ``workers`` of the chosen GPUs), ``threads_per_worker`` (torch/BLAS
        threads per worker, default cores / workers) and ``dashboard_address`` (127.0.0.1:8787
        by default, this machine only; ``"127.0.0.1:0"`` for any free port, ``"0.0.0.0:8787"``
        for every interface; a bare port ``":8787"`` means every interface, as in distributed).
    memory_limit
        Memory per worker (bytes or ``"16GB"``); default: RAM / workers.
    host
        Interface of the local scheduler and workers (loopback by default).
    timeout
        Seconds to wait when connecting to a scheduler.
    **changes
        Changes to ``options`` by field name (``workers=2``).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ConfigError
        If the scheduler or dashboard address is not an address (:func:`check_addresses`).
    ClusterError
        If the scheduler cannot be reached in ``timeout`` seconds or the local cluster fails.
    GPUUnavailableError
        If GPUs are requested and not visible.
    """
    options = merge(options, ClusterOptions, changes)
    refuse_unknown(changes, "a cluster option")
    scheduler, dashboard_address = options.scheduler, options.dashboard_address
    check_addresses(scheduler=scheduler, dashboard_address=dashboard_address)
    if scheduler is not None:
        with _attach(scheduler, timeout=timeout) as client:
            yield client
        return
    spec = _local_spec(options, memory_limit, host)
    try:
        # distributed sets MALLOC_TRIM_THRESHOLD_=65536 before spawning a worker. Setting it at
        # all turns off glibc's adaptive mmap threshold, so every large torch tensor is mmap'ed
        # and page-faulted afresh: measured 0.17 vs 0.08 s per CPU training step of the default
        # network (any value, 64 KiB or 128 MiB). None leaves glibc's defaults in the workers.
        with dask.config.set({PRE_SPAWN_TRIM: None}), warnings.catch_warnings():
            # A dashboard port in use (another user's Dask on a shared node) makes distributed
            # take another one with a four-line UserWarning; srdvol's dashboard line says it.
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
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
            f"check free memory and ports, or pass {flag('scheduler')} to use an existing cluster",
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
    options: ClusterOptions, memory_limit: int | str | None, host: str
) -> dict[str, dict[str, Any]]:
    workers, threads = options.workers, options.threads_per_worker
    ids = resolve_gpus(options.gpus)
    if ids:
        if workers is not None:
            if workers > len(ids):
                raise GPUUnavailableError(
                    flag("workers"),
                    f"{workers} GPU workers asked for but only {len(ids)} GPU(s) chosen",
                    f"lower {flag('workers')} or choose more GPUs with {flag('gpus')}",
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
                "start the scheduler with its --scheduler-file option first, or give its tcp:// "
                "address",
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
            f"check the address and that the scheduler is running, or leave out "
            f"{flag('scheduler')} to start a local cluster",
        ) from exc
    try:
        # Not the process-wide default (the caller may have its own), but current inside this
        # context, so dask/distributed helpers that look for "the" client find this one.
        with client.as_current():
            yield client
    finally:
        client.close()
