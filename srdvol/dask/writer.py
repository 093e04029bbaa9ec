"""The resumable writer: stores a lazy image block by block into a pre-created array.

:func:`write` submits the blocks of a lazy array (the result of
:func:`srdvol.dask.graph.denoise`) in order, at most ``wave`` unfinished at once, stores each
into the output (whose chunks or shards divide the blocks, so no two tasks write one chunk) and
records finished blocks in a :class:`~srdvol.dask.ledger.Ledger`, so that a rerun after a crash,
a kill or a Ctrl-C computes only what is missing. Tasks that neighbouring blocks share (input
read for a halo, sums spilled across an edge) run once: :mod:`srdvol.dask.runners` keeps their
results until the later block is submitted.

What bounds memory on a cluster: ``wave``, the most blocks submitted and not yet written, plus
one layer of the grid kept for the next row of blocks. By default a job whose input and output
fit in a quarter of the workers' memory (:data:`UPFRONT_MEMORY_FRACTION`) is submitted whole,
within :data:`UPFRONT_TASKS` (the dashboard's totals are then the whole job); any bigger job goes
in waves of twice the worker threads.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import GraphNode, Task, TaskRef

from srdvol import interrupt
from srdvol.dask.ledger import Ledger
from srdvol.dask.reports import patch_reports
from srdvol.dask.runners import DistributedRunner, LocalRunner, run_blocks
from srdvol.dask.units import BlockUnits, tasks_per_block
from srdvol.errors import ClusterError, ConfigError, DataError, flag

__all__ = [
    "UPFRONT_MEMORY_FRACTION",
    "UPFRONT_TASKS",
    "BlockDataError",
    "BlockInputError",
    "Progress",
    "WriteReport",
    "nonfinite_count",
    "write",
]

#: Most tasks :func:`write` hands the scheduler at once when no ``wave`` is given (the whole
#: job when it fits): ~1e5 tasks is what one scheduler handles well; half leaves room.
UPFRONT_TASKS = 50_000
#: Submit a whole job at once only when its input and output together take at most this share
#: of the workers' memory: the scheduler's root-task queuing bounds what *runs*, not what is
#: read early for halos and kept for blocks not yet run, so a big job goes in bounded waves.
UPFRONT_MEMORY_FRACTION = 0.25
#: Seconds between writes of the ledger file (a killed run redoes at most this much work).
LEDGER_INTERVAL = 2.0
#: Name prefix of the tasks that compute a block's spills (see :mod:`srdvol.dask.graph`).
EAGER_PREFIX = "srdvol-spill-"


class BlockDataError(DataError):
    """A block holds NaN or Inf values; the run stops and names the block."""


class BlockInputError(BlockDataError):
    """A block's input holds NaN or Inf values (in chunks the statistics sample did not read)."""


def nonfinite_count(values: np.ndarray) -> int:
    """NaN and Inf values in a block's output (a block is never written with any): one float64
    sum when there are none, which is finite exactly when every term is and needs no
    temporary."""
    if np.isfinite(values.sum(dtype=np.float64)):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))


@dataclass(frozen=True)
class Progress:
    """A snapshot passed to progress callbacks: with the totals first, after every finished
    block, and about every second while long blocks run (``patches`` grows)."""

    done: int
    total: int
    computed: int
    skipped: int
    voxels: int
    elapsed: float
    #: Patches the model has predicted in this run so far (finished and running blocks).
    patches: int = 0

    @property
    def voxels_per_s(self) -> float:
        """Voxels written per second in this run."""
        return self.voxels / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at this run's block rate (None before the first block)."""
        if self.computed == 0:
            return None
        return (self.total - self.done) * self.elapsed / self.computed


@dataclass(frozen=True)
class WriteReport:
    """What :func:`write` did."""

    total: int
    computed: int
    skipped: int
    voxels: int
    seconds: float
    max_in_flight: int


def _store_block(block: np.ndarray, target: Any, region: tuple[slice, ...]) -> int:
    target[region] = (
        block.astype(target.dtype, copy=False)
        if target.dtype.kind == "f"
        else (_to_int(block, target.dtype))
    )
    return int(block.size)


def _to_int(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(block), info.min, info.max).astype(dtype)


def _check_alignment(lazy: da.Array, target: Any) -> None:
    if tuple(target.shape) != tuple(lazy.shape):
        raise ConfigError(
            "output",
            f"output shape {tuple(target.shape)} differs from the image shape {tuple(lazy.shape)}",
            "create the output like the input",
        )
    grid = getattr(target, "shards", None) or target.chunks
    for a, (sizes, c) in enumerate(zip(lazy.chunks, grid, strict=True)):
        edges = np.cumsum(sizes)[:-1]
        if np.any(edges % c):
            raise ConfigError(
                flag("block"),
                f"processing blocks along axis {a} ({sizes[:3]}...) are not multiples of the "
                f"output chunks/shards ({c}); unaligned writes lose data",
                "give denoise(chunks=...) the output array's chunk (or shard) shape",
            )


def write(
    lazy: Any,
    target: Any,
    *,
    ledger: str | os.PathLike[str] | None = None,
    run_id: str = "",
    wave: int | None = None,
    client: Any = None,
    threads: int = 1,
    progress: Callable[[Progress], None] | None = None,
) -> WriteReport:
    """Store a lazy image into a pre-created array block by block, resumably.

    Parameters
    ----------
    lazy
        The result of :func:`~srdvol.dask.graph.denoise` (dask array or xarray.DataArray); one
        block = one dask chunk.
    target
        Writable ``zarr.Array`` of the same shape whose chunks (or shards) divide the blocks.
    ledger
        Path or URL of the ledger file; finished blocks listed there are skipped. None: no resume.
    run_id
        Identifies the run in the ledger (e.g. the provenance run id); a different id refuses
        to resume.
    wave
        Most blocks in flight (submitted and not yet written) at once. Default on a cluster:
        the whole job (up to :data:`UPFRONT_TASKS` tasks) when its input and output fit in
        :data:`UPFRONT_MEMORY_FRACTION` of the workers' memory, else twice the worker threads;
        in this process: twice ``threads``.
    client
        A ``distributed.Client``; None computes in this process.
    threads
        Threads that run blocks in this process; one more reads and writes while a block is in
        the model (one block runs the model at a time).
    progress
        Called with a :class:`Progress` first with the totals, then after every finished block
        (e.g. a :class:`srdvol.progress.DenoisingProgress`).

    Returns
    -------
    WriteReport
        Counts of computed and skipped blocks, voxels written, time, and the most blocks that were
        in flight at once.

    Raises
    ------
    ClusterError
        A block's worker died again and again (distributed retries a block whose worker dies).
    KeyboardInterrupt
        Ctrl-C or SIGTERM: pending blocks are cancelled, the ledger is written, and a note says
        how many blocks are kept.
    """
    data = lazy.data if _is_dataarray(lazy) else lazy
    _check_alignment(data, target)
    grid = data.numblocks
    total = math.prod(grid)
    book = None
    if ledger is not None:
        book = Ledger(
            ledger,
            nblocks=grid,
            fingerprint={
                "shape": list(data.shape),
                "chunks": [list(c) for c in data.chunks],
                "run_id": run_id,
            },
            interval=LEDGER_INTERVAL,
        )
        book.flush()
    units = BlockUnits(data, eager_prefix=EAGER_PREFIX)
    order = units.order(i for i in range(total) if book is None or not book.is_done(i))
    skipped = total - len(order)
    if wave is None:
        wave = _default_wave(data, units, client=client, threads=threads)
    started = time.monotonic()
    computed = voxels = peak = patches = 0

    def snapshot() -> Progress:
        return Progress(
            done=skipped + computed,
            total=total,
            computed=computed,
            skipped=skipped,
            voxels=voxels,
            elapsed=time.monotonic() - started,
            patches=patches,
        )

    def finished(flat: int, n: int) -> None:
        nonlocal computed, voxels
        computed += 1
        voxels += n
        if book is not None:
            book.mark(flat)
        if progress is not None:
            progress(snapshot())

    def predicted(n: int) -> None:
        nonlocal patches
        patches += n
        if progress is not None:
            progress(snapshot())

    tag = data.name.rsplit("-", 1)[-1][:12]

    def store(flat: int, block: GraphNode | None) -> tuple[Any, GraphNode]:
        index = units.index(flat)
        region = tuple(
            slice(int(sum(c[:i])), int(sum(c[: i + 1])))
            for c, i in zip(data.chunks, index, strict=True)
        )
        key = f"srdvol-write-{tag}-{flat}"
        source = block if block is not None else TaskRef(units.output_key(flat))
        return key, Task(key, _store_block, source, target, region)

    if progress is not None:
        progress(
            Progress(done=skipped, total=total, computed=0, skipped=skipped, voxels=0, elapsed=0.0)
        )
    runner = DistributedRunner(client) if client is not None else LocalRunner(threads + 1)
    try:
        with patch_reports(client, data.name, predicted):
            peak = run_blocks(units, runner, order, store=store, finished=finished, wave=wave)
    except KeyboardInterrupt as exc:
        where = f" and recorded in {book.path}" if book is not None else ""
        interrupt.keep(exc, f"{skipped + computed} of {total} blocks written{where}")
        raise
    except Exception as exc:
        _raise_cluster_error(exc)
        raise
    finally:
        runner.close()
        if book is not None:
            book.flush()
    return WriteReport(
        total=total,
        computed=computed,
        skipped=skipped,
        voxels=voxels,
        seconds=time.monotonic() - started,
        max_in_flight=peak,
    )


def _is_dataarray(obj: Any) -> bool:
    return type(obj).__name__ == "DataArray" and hasattr(obj, "dims")


def _raise_cluster_error(exc: Exception) -> None:
    """Turn distributed's KilledWorker into one sentence naming the block."""
    try:
        from distributed import KilledWorker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return
    if isinstance(exc, KilledWorker):
        key = exc.task
        index = key[1:] if isinstance(key, tuple) else ()
        raise ClusterError(
            f"block {tuple(index)}" if index else f"task {key!r}",
            "the workers computing it died again and again (distributed retried it; "
            f"last on {exc.last_worker.address if exc.last_worker else 'a worker'}), "
            "most often from running out of memory",
            f"rerun the same command to resume, with a smaller {flag('block')} or more memory per "
            "worker",
        ) from None


def _default_wave(data: da.Array, units: BlockUnits, *, client: Any, threads: int) -> int:
    """Blocks in flight when ``wave`` is not given (see the module docstring)."""
    if client is None:
        return 2 * max(1, threads)
    from srdvol.dask.workers import live_workers

    workers = live_workers(client)
    slots = 2 * max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    memory = sum(int(w.get("memory_limit") or 0) for w in workers.values())
    if not memory or 2 * data.nbytes > UPFRONT_MEMORY_FRACTION * memory:
        return slots  # a big job: bounded waves
    return max(slots, UPFRONT_TASKS // tasks_per_block(units))
