"""The out-of-core engine: a lazy denoised array, and a resumable writer that stores it.

:func:`denoise` builds the denoised image as a lazy dask array with ``dask.array.map_overlap``
(halo on t, y, x only, ``boundary="none"``; array edges are handled inside the block function from
global offsets). :func:`write` stores that array block by block into a pre-created output array,
keeping at most ``wave`` blocks in flight, and records finished blocks in a :class:`Ledger` so that
a rerun after a crash, a kill or a Ctrl-C computes only what is missing.

What bounds memory on a cluster: ``wave``, the most blocks submitted and not yet written. By
default a job whose input and output fit in a quarter of the workers' memory
(:data:`UPFRONT_MEMORY_FRACTION`) is submitted whole, within :data:`UPFRONT_TASKS` (so the
dashboard's totals are the whole job from the start); the scheduler's root-task queuing
(``distributed.scheduler.worker-saturation``) then decides what runs, and whatever map_overlap
holds for blocks not yet run fits in memory by that rule. Any bigger job goes in waves of twice
the worker threads, as an explicit ``wave`` does.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from srdvol import interrupt
from srdvol.axes import MOVIE_AXES, parse_axes
from srdvol.core.tiling import BlockPlan, Window, plan_blocks
from srdvol.errors import (
    ClusterError,
    ConfigError,
    DataError,
    InputError,
    OutputExistsError,
    UnsupportedDtypeError,
)
from srdvol.predict.predictors import (
    ModelPredictor,
    Predictor,
    as_patch,
    check_frames,
    predict_block,
)

__all__ = [
    "BlockDataError",
    "BlockInputError",
    "Ledger",
    "Progress",
    "WriteReport",
    "denoise",
    "write",
]

#: Default budget for one block's working buffers (core + halo, float32 sums).
DEFAULT_BLOCK_MEMORY = 512 * 2**20
#: Most tasks :func:`write` hands the scheduler at once when no ``wave`` is given (the whole
#: job when it fits): ~1e5 tasks is what one scheduler handles well; half leaves room.
UPFRONT_TASKS = 50_000
#: Submit a whole job at once only when its input and output together take at most this share
#: of the workers' memory: the scheduler's root-task queuing bounds what *runs*, but the halo
#: pieces that map_overlap cuts for blocks not yet run wait in memory (measured: 475 such pieces
#: held for 64 blocks, 1,586 for 256), so a big job goes in bounded waves instead.
UPFRONT_MEMORY_FRACTION = 0.25


class BlockDataError(DataError):
    """A block holds NaN or Inf values; the run stops and names the block."""


class BlockInputError(BlockDataError):
    """A block's input holds NaN or Inf values (in chunks the statistics sample did not read)."""


# ---------------------------------------------------------------------------------------------
# The lazy denoised array


def denoise(
    array: Any,
    model: Predictor | str | os.PathLike[str],
    *,
    patch: Sequence[int] | Mapping[str, int] | None = None,
    overlap: float = 0.25,
    block: Sequence[int] | Mapping[str, int] | None = None,
    window: Window | str = Window.TENT,
    dims: str | Sequence[str] | None = None,
    chunks: Sequence[int] | Mapping[str, int] | None = None,
    memory: int = DEFAULT_BLOCK_MEMORY,
    batch_size: int | None = None,
) -> Any:
    """Return the denoised image as a lazy array (nothing is computed).

    Parameters
    ----------
    array
        An :class:`xarray.DataArray` (dims from it), or a dask/numpy array with ``dims``.
    model
        A :class:`~srdvol.predict.predictors.Predictor` or the path of a model file.
    patch
        Patch size (t, y, x); default: the model's (``model.patch``).
    overlap
        Patch overlap fraction in ``[0, 1)``.
    block
        Processing block (t, y, x), rounded up to multiples of ``chunks``; default grows from the
        chunks until a block's buffers reach ``memory`` bytes.
    window
        Blending window, ``"tent"`` or ``"cos2"``.
    dims
        Axis names for a non-xarray input, e.g. ``"tzyx"``.
    chunks
        Output chunk (or shard) shape that block boundaries must align to (tuple in array order or
        dict by axis name); default: the input's chunks (``attrs["store_chunks"]`` for an image
        from :func:`srdvol.ngff.read.open_image`).
    memory
        Per-block buffer budget in bytes when ``block`` is None.
    batch_size
        Patches per predictor call.

    Returns
    -------
    xarray.DataArray or dask.array.Array
        float32, same shape and dims (and coords/attrs for xarray input); its dask chunks are the
        processing blocks.
    """
    labelled = _is_dataarray(array)
    if labelled:
        names = parse_axes(list(array.dims), subject="array")
        data = array.data
    else:
        if dims is None:
            raise InputError(
                "dims",
                "a dask or numpy array has no axis names",
                "pass dims, for example dims='tzyx'",
            )
        names = parse_axes(dims, subject="dims")
        data = array
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    if len(names) != data.ndim:
        raise InputError(
            "dims", f"{len(names)} axis names for a {data.ndim}-D array", "give one name per axis"
        )
    if data.dtype.kind not in "iuf":
        raise UnsupportedDtypeError(
            "array",
            f"dtype {data.dtype} cannot be denoised",
            "convert it to an integer or real floating-point type",
        )
    check_frames(data.shape[names.index("t")], subject="array")
    predictor: Predictor = (
        ModelPredictor(model, patch=patch) if isinstance(model, str | os.PathLike) else model
    )
    if patch is None:
        patch = getattr(predictor, "patch", None)
        if patch is None:
            raise ConfigError("--patch", f"{predictor!r} has no patch size", "pass patch=(T, Y, X)")
    sizes = as_patch(patch)
    if chunks is None and labelled and "store_chunks" in array.attrs:
        chunks = dict(array.attrs["store_chunks"])
    out_chunks = _per_axis(chunks, names) if chunks is not None else data.chunksize
    wanted = _per_axis(block, names, movie_only=True) if block is not None else None
    plan = plan_blocks(
        data.shape,
        dims=names,
        patch=sizes,
        overlap=overlap,
        chunks=out_chunks,
        block=wanted,
        memory=memory,
    )
    result = _lazy(
        data,
        plan,
        predictor=_PatchCounter(predictor),
        window_kind=Window(window),
        overlap=overlap,
        batch_size=batch_size,
    )
    if labelled:
        import xarray as xr

        return xr.DataArray(
            result, dims=array.dims, coords=array.coords, attrs=dict(array.attrs), name=array.name
        )
    return result


def _is_dataarray(obj: Any) -> bool:
    return type(obj).__name__ == "DataArray" and hasattr(obj, "dims")


def _per_axis(
    value: Sequence[int] | Mapping[str, int], names: tuple[str, ...], *, movie_only: bool = False
) -> Any:
    if isinstance(value, Mapping):
        return (
            {a: int(v) for a, v in value.items()}
            if movie_only
            else tuple(int(value[a]) for a in names)
        )
    values = tuple(int(v) for v in value)
    expected = MOVIE_AXES if movie_only else names
    if len(values) != len(expected):
        what = "--block" if movie_only else "--chunks"
        raise ConfigError(
            what,
            f"{values} does not give one size per axis {''.join(expected)}",
            f"give {len(expected)} sizes",
        )
    return dict(zip(expected, values, strict=True)) if movie_only else values


def _lazy(
    data: da.Array,
    plan: BlockPlan,
    *,
    predictor: Predictor,
    window_kind: Window,
    overlap: float,
    batch_size: int | None,
) -> da.Array:
    data = data.rechunk(plan.chunks)
    depth = {a: d for a, d in enumerate(plan.depth)}
    return da.map_overlap(
        _denoise_block,
        data,
        depth=depth,
        boundary="none",
        trim=False,  # the block function returns its core only
        chunks=plan.chunks,
        dtype=np.float32,
        meta=np.empty((0,) * data.ndim, dtype=np.float32),
        allow_rechunk=False,
        plan=plan,
        predictor=predictor,
        window_kind=window_kind,
        overlap=overlap,
        batch_size=batch_size,
    )


def _denoise_block(
    x: np.ndarray,
    *,
    plan: BlockPlan,
    predictor: Predictor,
    window_kind: Window,
    overlap: float,
    batch_size: int | None,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    # block_info locations refer to the overlapped array: derive global offsets from the block
    # index and the plan's chunks, and check the halo dask actually attached.
    if block_info is None:  # dask passes it to every function that accepts it
        raise RuntimeError("map_overlap gave no block_info")
    location = block_info[0]["chunk-location"]
    starts, stops, lefts = [], [], []
    for a, i in enumerate(location):
        start = sum(plan.chunks[a][:i])
        stop = start + plan.chunks[a][i]
        left = min(plan.depth[a], start)
        right = min(plan.depth[a], plan.shape[a] - stop)
        if x.shape[a] != stop - start + left + right:
            raise RuntimeError(
                f"block {tuple(location)} axis {plan.dims[a]}: got {x.shape[a]} voxels, expected "
                f"core {stop - start} + halo {left}+{right}"
            )
        starts.append(start)
        stops.append(stop)
        lefts.append(left)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        where = ", ".join(f"{a}={s}:{e}" for a, s, e in zip(plan.dims, starts, stops, strict=True))
        raise BlockInputError(
            f"block {tuple(location)} ({where})",
            "the input holds NaN or Inf values",
            "replace them (e.g. with the local median) and run again",
        )
    movie = [plan.dims.index(a) for a in MOVIE_AXES]
    moved = np.moveaxis(x, movie, (-3, -2, -1))
    core = [(starts[a], stops[a]) for a in movie]
    out = np.empty(moved.shape[:-3] + tuple(e - s for s, e in core), dtype=np.float32)
    for idx in np.ndindex(moved.shape[:-3]):
        out[idx] = predict_block(
            moved[idx],
            predictor=predictor,
            patch=plan.patch,
            overlap=overlap,
            origin=[starts[a] - lefts[a] for a in movie],
            shape=[plan.shape[a] for a in movie],
            core=core,
            window_kind=window_kind,
            batch_size=batch_size,
        )
    if not np.isfinite(out).all():  # never write NaN/Inf and report success
        where = ", ".join(f"{a}={s}:{e}" for a, s, e in zip(plan.dims, starts, stops, strict=True))
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise BlockDataError(
            f"block {tuple(location)} ({where})",
            f"the model's output holds {bad} NaN or Inf value(s) although the input is finite",
            "retrain the model (or use another one) and run again; nothing of this block "
            "was written",
        )
    return np.moveaxis(out, (-3, -2, -1), movie)


# ---------------------------------------------------------------------------------------------
# Patches predicted inside running blocks (progress while a long block runs)

#: Event topic on which workers report the patches they predicted.
PATCH_TOPIC = "srdvol-patches"
#: Least seconds between two patch reports of one process.
PATCH_REPORT_EVERY = 1.0

_patch_lock = threading.Lock()
_patch_pending: dict[str, int] = {}
_patch_sent = 0.0
#: Receives (array name, patches) in this process (the writer's in-process path).
_patch_sink: Callable[[str, int], None] | None = None


class _PatchCounter:
    """A :class:`~srdvol.predict.predictors.Predictor` that counts the patches it predicts and reports them
    (to the writer that runs the block), so that a block which takes minutes still shows
    progress. Attributes (``patch``, ``batch_size``) are the wrapped predictor's."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        out = self.inner(patches)
        _count_patches(len(patches))
        return out

    def __dask_tokenize__(self) -> Any:
        return ("srdvol-patch-counter", dask.base.tokenize(self.inner))

    def __repr__(self) -> str:
        return repr(self.inner)


def _count_patches(n: int) -> None:
    global _patch_sent
    name = _running_array()
    if name is None:
        return
    with _patch_lock:
        _patch_pending[name] = _patch_pending.get(name, 0) + int(n)
        now = time.monotonic()
        if now - _patch_sent < PATCH_REPORT_EVERY:
            return
        _patch_sent = now
        batch = dict(_patch_pending)
        _patch_pending.clear()
    _send_patches(batch)


def _running_array() -> str | None:
    """The dask array whose block this thread computes (a worker task), or "" in-process."""
    try:
        from distributed.worker import thread_state
    except ImportError:  # pragma: no cover - distributed is a dependency
        return ""
    key = getattr(thread_state, "key", None)
    if key is None:
        return "" if _patch_sink is not None else None
    return str(key[0] if isinstance(key, tuple) else key)


def _send_patches(batch: dict[str, int]) -> None:
    sink = _patch_sink
    if sink is not None and "" in batch:
        sink("", batch.pop(""))
    if not batch:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not in a worker
        return
    for name, n in batch.items():
        worker.log_event(PATCH_TOPIC, {"array": name, "patches": n})


@contextmanager
def _patch_reports(client: Any, name: str, on_patches: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_patches(n)`` as blocks of array ``name`` report predicted patches."""
    global _patch_sink

    def from_worker(event: Any) -> None:
        msg = event[1]
        if isinstance(msg, dict) and msg.get("array") == name:
            on_patches(int(msg.get("patches", 0)))

    if client is not None:
        client.subscribe_topic(PATCH_TOPIC, from_worker)
    else:
        with _patch_lock:
            _patch_pending.pop("", None)  # left over from an earlier in-process write
        _patch_sink = lambda _name, n: on_patches(n)  # noqa: E731
    try:
        yield
    finally:
        if client is not None:
            with suppress(Exception):
                client.unsubscribe_topic(PATCH_TOPIC)
        else:
            _patch_sink = None


# ---------------------------------------------------------------------------------------------
# Ledger of finished blocks


class Ledger:
    """Which blocks of a run are finished: a bitmap in one small JSON file, written by the client.

    1e5 blocks take 12.5 kB. The file is replaced atomically (temporary file + rename on local
    disks; a single PUT through fsspec for URLs), at most every ``interval`` seconds, so a kill
    loses at most the last few records (those blocks are simply computed again).

    Parameters
    ----------
    path
        Local path or fsspec URL of the ledger file (e.g. ``out.zarr/srdvol_ledger.json``).
    nblocks
        Block grid shape.
    fingerprint
        What identifies the run (shape, block chunks, run id); a ledger with another fingerprint
        raises :class:`~srdvol.errors.OutputExistsError`.
    interval
        Seconds between writes of the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        nblocks: Sequence[int],
        fingerprint: Mapping[str, Any],
        interval: float = 2.0,
    ) -> None:
        self.path = os.fspath(path)
        self.nblocks = tuple(int(n) for n in nblocks)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
        self.interval = float(interval)
        self._done = np.zeros(math.prod(self.nblocks), dtype=bool)
        self._last = 0.0
        self._dirty = False
        text = _read_text(self.path)
        if text is not None:
            stored = json.loads(text)
            if stored.get("fingerprint") != self.fingerprint or stored.get("grid") != list(
                self.nblocks
            ):
                raise OutputExistsError(
                    self.path,
                    "this ledger belongs to a run with other parameters (shape, blocks or run id)",
                    "rerun with the same --block and model, or pass --overwrite to start again",
                )
            bits = np.frombuffer(zlib.decompress(base64.b64decode(stored["done"])), dtype=np.uint8)
            self._done[:] = np.unpackbits(bits, count=self._done.size).astype(bool)

    def is_done(self, flat: int) -> bool:
        """Whether block number ``flat`` (C order over the grid) is finished."""
        return bool(self._done[flat])

    @property
    def count(self) -> int:
        """Number of finished blocks."""
        return int(self._done.sum())

    def mark(self, flat: int) -> None:
        """Record block ``flat`` as finished (written to the file by :meth:`flush`)."""
        self._done[flat] = True
        self._dirty = True
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write the ledger file now if anything changed."""
        if not self._dirty and self._last:
            return
        bits = base64.b64encode(zlib.compress(np.packbits(self._done).tobytes())).decode()
        payload = json.dumps(
            {
                "version": 1,
                "grid": list(self.nblocks),
                "fingerprint": self.fingerprint,
                "done": bits,
            }
        )
        _write_text(self.path, payload)
        self._dirty = False
        self._last = time.monotonic()


def _is_url(path: str) -> bool:
    return "://" in path


def _read_text(path: str) -> str | None:
    if _is_url(path):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(path)
        if not fs.exists(inner):
            return None
        with fs.open(inner, "rt") as f:
            return f.read()
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_text(path: str, text: str) -> None:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "wt") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The wave writer


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
                "--block",
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
    ledger_interval: float = 2.0,
) -> WriteReport:
    """Store a lazy image into a pre-created array block by block, resumably.

    Parameters
    ----------
    lazy
        The result of :func:`denoise` (dask array or xarray.DataArray); one block = one dask chunk.
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
        A ``distributed.Client``; None computes in this process with ``threads`` threads.
    threads
        Threads for the in-process path.
    progress
        Called with a :class:`Progress` first with the totals, then after every finished block
        (e.g. a :class:`srdvol.progress.DenoisingProgress`).
    ledger_interval
        Seconds between ledger file writes.

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
            interval=ledger_interval,
        )
        book.flush()
    todo = [i for i in range(total) if book is None or not book.is_done(i)]
    skipped = total - len(todo)
    subgraph = _block_graphs(data)
    if wave is None:
        wave = _default_wave(data, subgraph, client=client, threads=threads)
    wave = max(1, int(wave))
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

    def task(flat: int) -> Any:
        index = tuple(int(i) for i in np.unravel_index(flat, grid))
        region = tuple(
            slice(int(sum(c[:i])), int(sum(c[: i + 1])))
            for c, i in zip(data.chunks, index, strict=True)
        )
        key = (data.name, *index)
        block = Delayed(key, subgraph(key))
        name = f"srdvol-write-{data.name.rsplit('-', 1)[-1][:12]}-{flat}"
        return dask.delayed(_store_block, pure=False)(block, target, region, dask_key_name=name)

    if progress is not None:
        progress(
            Progress(done=skipped, total=total, computed=0, skipped=skipped, voxels=0, elapsed=0.0)
        )
    runner = _run_distributed if client is not None else _run_threads
    try:
        with _patch_reports(client, data.name, predicted):
            peak = runner(todo, task, finished, wave=wave, client=client, threads=threads)
    except KeyboardInterrupt as exc:
        where = f" and recorded in {book.path}" if book is not None else ""
        interrupt.keep(exc, f"{skipped + computed} of {total} blocks written{where}")
        raise
    finally:
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


def _block_graphs(data: da.Array) -> Callable[[tuple[Any, ...]], dict[Any, Any]]:
    # Slicing the array per block (``data.blocks[i]``) re-optimises the whole graph every time:
    # quadratic in the number of blocks (0.5 s per block at 65k blocks). Culling one high-level
    # graph, whose layers materialise once and are cached, costs milliseconds per block.
    graph = data.__dask_graph__()
    if isinstance(graph, HighLevelGraph):
        return lambda key: dict(graph.cull({key}))
    from dask.optimization import cull

    return lambda key: cull(dict(graph), [key])[0]


def _client_threads(client: Any) -> int:
    from srdvol.dask.workers import live_workers

    workers = live_workers(client)
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def _default_wave(
    data: da.Array,
    subgraph: Callable[[tuple[Any, ...]], dict[Any, Any]],
    *,
    client: Any,
    threads: int,
) -> int:
    """Blocks in flight when ``wave`` is not given (see the module docstring)."""
    if client is None:
        return 2 * max(1, threads)
    from srdvol.dask.workers import live_workers

    workers = live_workers(client)
    slots = 2 * max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    memory = sum(int(w.get("memory_limit") or 0) for w in workers.values())
    if not memory or 2 * data.nbytes > UPFRONT_MEMORY_FRACTION * memory:
        return slots  # a big job: bounded waves
    first = (data.name, *(0,) * data.ndim)
    per_block = len(subgraph(first)) + 1  # its reads, halo pieces, the model, the store
    return max(slots, UPFRONT_TASKS // per_block)


def _run_threads(
    todo: list[int],
    task: Callable[[int], Any],
    finished: Callable[[int, int], None],
    *,
    wave: int,
    client: Any,
    threads: int,
) -> int:
    # One synchronous dask compute per block in a small pool; at most `wave` submitted at once.
    peak = 0
    pending: dict[Any, int] = {}
    queue = iter(todo)
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        while True:
            for flat in queue:
                pending[pool.submit(dask.compute, task(flat), scheduler="sync")] = flat
                if len(pending) >= wave:
                    break
            peak = max(peak, len(pending))
            if not pending:
                return peak
            done, _ = wait_futures(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                flat = pending.pop(fut)
                (n,) = fut.result()
                finished(flat, n)
    except BaseException:
        # An error or a Ctrl-C: queued blocks never start; running ones end on their own.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)


def _run_distributed(
    todo: list[int],
    task: Callable[[int], Any],
    finished: Callable[[int, int], None],
    *,
    wave: int,
    client: Any,
    threads: int,
) -> int:
    from distributed import KilledWorker, as_completed

    # Refill in half-waves: each client.compute call optimises its blocks' graphs together.
    peak = 0
    queue = list(todo)
    pos = 0
    pending: dict[Any, int] = {}

    def submit(n: int) -> list[Any]:
        nonlocal pos
        flats = queue[pos : pos + n]
        pos += len(flats)
        if not flats:
            return []
        futures = client.compute([task(f) for f in flats])
        pending.update(zip(futures, flats, strict=True))
        return futures

    stream = as_completed(submit(wave))
    peak = len(pending)
    refill = max(1, wave // 2)
    try:
        for fut in stream:
            flat = pending.pop(fut)
            try:
                n = fut.result()
            except KilledWorker as exc:
                raise ClusterError(
                    f"block {flat}",
                    "the workers computing it died again and again (distributed retried it; "
                    f"last on {exc.last_worker.address if exc.last_worker else 'a worker'}), "
                    "most often from running out of memory",
                    "rerun the same command to resume, with a smaller --block or more memory "
                    "per worker",
                ) from None
            finished(flat, n)
            if wave - len(pending) >= refill and pos < len(queue):
                stream.update(submit(wave - len(pending)))
                peak = max(peak, len(pending))
    except BaseException:
        client.cancel(list(pending))
        raise
    return peak
