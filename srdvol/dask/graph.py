"""The lazy denoised image: a dask graph in which every lattice patch is predicted once.

:func:`denoise` builds three steps of one graph over processing blocks aligned to the output
chunks (:func:`srdvol.core.tiling.plan_blocks`):

1. ``dask.array.map_overlap`` with depth ``(0, patch - 1)`` on t, y, x only and
   ``boundary="none"``: each block gets its core plus the high-side halo its own patches reach
   into, predicts the lattice patches whose start lies in its core (global offsets from the
   block position) and returns ``Σ w·pred`` (float64) over that extended region.
2. Spill tasks (``srdvol-spill-...``) cut the part of a block's sums that lies past each of its
   high edges, one piece per neighbour it falls into.
3. Combine tasks (the denoised array) add a block's own sums over its core and the pieces its
   lower neighbours spilled into it (overlap-add), divide by ``Σ w`` (exact, per axis, see
   :mod:`srdvol.core.blend`) and return float32.

Every weighted sum is exact (integer window weights), so the result equals one whole-array pass
for any blocks. :func:`write` (in :mod:`srdvol.dask.writer`) stores the array resumably.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask._task_spec import List, Task, TaskRef
from dask.graph_manipulation import clone
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from srdvol.axes import MOVIE_AXES, parse_axes
from srdvol.core.blend import divide, weight_sums
from srdvol.core.tiling import BlockMemory, BlockPlan, Window, plan_blocks
from srdvol.dask.budget import local_budget
from srdvol.dask.ledger import Ledger
from srdvol.dask.reports import count_patches
from srdvol.dask.writer import (
    EAGER_PREFIX,
    BlockDataError,
    BlockInputError,
    Progress,
    WriteReport,
    nonfinite_count,
    write,
)
from srdvol.errors import ConfigError, InputError, UnsupportedDtypeError, flag
from srdvol.predict.block import Placement, block_sums, model_turn
from srdvol.predict.guide import mean_image
from srdvol.predict.predictors import ModelPredictor, Predictor, as_patch, check_frames
from srdvol.values import DEFAULT_ANCHOR

__all__ = [
    "SPILL_PREFIX",
    "BlockDataError",
    "BlockInputError",
    "Ledger",
    "Progress",
    "WriteReport",
    "denoise",
    "write",
]

#: Name prefix of the spill tasks; the writer computes them with the block they come from, so
#: that a neighbour waits for a slice of that block's sums, not for all of them.
SPILL_PREFIX = EAGER_PREFIX


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
) -> Any:
    """Return the denoised image as a lazy array (nothing is computed).

    Parameters
    ----------
    array
        An :class:`xarray.DataArray` (dims from it), or a dask/numpy array with ``dims``.
    model
        A :class:`~srdvol.predict.predictors.Predictor` or the path of a model file. A file is
        run as ``srdvol predict`` runs it, with the default ``--anchor``
        (:data:`srdvol.values.DEFAULT_ANCHOR`); for other settings pass
        ``ModelPredictor(path, anchor=..., tta=..., guide=...)``.
    patch
        Patch size (t, y, x); default: the model's (``model.patch``).
    overlap
        Patch overlap fraction in ``[0, 1)``.
    block
        Processing block (t, y, x), rounded up to multiples of ``chunks`` and to at least
        ``patch - 1``; default: sized to a share of a local worker's memory
        (:func:`srdvol.dask.budget.local_budget`, which also bounds a block's region by the
        GPU's memory). For a cluster of other machines, size it with
        :func:`srdvol.core.tiling.plan_blocks` and :func:`srdvol.dask.budget.cluster_budget`.
    window
        Blending window, ``"tent"`` or ``"cos2"``.
    dims
        Axis names for a non-xarray input, e.g. ``"tzyx"``.
    chunks
        Output chunk (or shard) shape that block boundaries must align to (tuple in array order or
        dict by axis name); default: the input's chunks (``attrs["store_chunks"]`` for an image
        from :func:`srdvol.ngff.read.open_image`).

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
    # --guide's mean image reads whole storage chunks of a lazy input; an in-memory one has
    # none, and averages evenly spaced frames as predict_array does
    stored = isinstance(data, da.Array)
    if not stored:
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
        ModelPredictor(model, patch=patch, anchor=DEFAULT_ANCHOR)
        if isinstance(model, str | os.PathLike)
        else model
    )
    if patch is None:
        patch = getattr(predictor, "patch", None)
        if patch is None:
            raise ConfigError(
                flag("patch"), f"{predictor!r} has no patch size", "pass patch=(T, Y, X)"
            )
    sizes = as_patch(patch)
    if chunks is None and labelled and "store_chunks" in array.attrs:
        chunks = dict(array.attrs["store_chunks"])
    out_chunks = _per_axis(chunks, names) if chunks is not None else data.chunksize
    wanted = _per_axis(block, names, movie_only=True) if block is not None else None
    budget = local_budget() if block is None else None
    plan = plan_blocks(
        data.shape,
        dims=names,
        patch=sizes,
        overlap=overlap,
        chunks=out_chunks,
        block=wanted,
        memory=BlockMemory(budget.host, budget.device) if budget else 0,
        itemsize=data.dtype.itemsize,
    )
    result = _lazy(
        data,
        plan,
        predictor=predictor,
        window_kind=Window(window),
        overlap=overlap,
        stored=stored,
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
        what = flag("block") if movie_only else flag("chunks")
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
    stored: bool = True,
) -> da.Array:
    # --guide: the input's mean image, one small task every block depends on (and a worker
    # fetches once); None keeps the graph as it was. It reads a few storage chunks of its own
    # (a clone of the reads): taken from the blocks, it would wait for every block of the
    # input to be read and held in memory; sharing the blocks' reads, it would hold its chunks
    # until their blocks run.
    guide = None
    if getattr(predictor, "guide", 0):
        t = plan.dims.index("t")
        guide = mean_image(clone(data), t, chunks=data.chunks[t] if stored else None)
    # Plain tasks, never distributed's P2P rechunk (which dask picks when a Client is the
    # default): its all-to-all barrier cannot run block by block, nor without a cluster.
    data = data.rechunk(plan.chunks, method="tasks")
    token = dask.base.tokenize(data.name, plan, predictor, window_kind, overlap)
    name = f"srdvol-denoise-{token}"
    depth = {a: (0, d) if d else 0 for a, d in enumerate(plan.depth)}
    sums = da.map_overlap(
        _sums_block,
        data,
        depth=depth,
        boundary="none",
        trim=False,  # the block function returns its extended region: overlap-add follows
        chunks=plan.extended_chunks,
        dtype=np.float64,
        meta=np.empty((0,) * data.ndim, dtype=np.float64),
        allow_rechunk=False,
        plan=plan,
        predictor=predictor,
        window_kind=window_kind,
        overlap=overlap,
        tag=name,
        **({"guide": guide} if guide is not None else {}),
    )
    spill = f"{SPILL_PREFIX}{token}"
    spills, combine = _overlap_add(sums.name, spill, name, plan, window_kind, overlap)
    below = sums.__dask_graph__()
    graph = HighLevelGraph(
        {**below.layers, spill: MaterializedLayer(spills), name: MaterializedLayer(combine)},
        {**below.dependencies, spill: {sums.name}, name: {sums.name, spill}},
    )
    return da.Array(
        graph,
        name,
        chunks=plan.chunks,
        dtype=np.float32,
        meta=np.empty((0,) * data.ndim, dtype=np.float32),
    )


def _block_bounds(plan: BlockPlan, location: Sequence[int]) -> tuple[list[int], list[int]]:
    starts = [plan.starts(a)[i] for a, i in enumerate(location)]
    stops = [s + plan.chunks[a][i] for a, (s, i) in enumerate(zip(starts, location, strict=True))]
    return starts, stops


def _where(plan: BlockPlan, location: Sequence[int]) -> str:
    starts, stops = _block_bounds(plan, location)
    span = ", ".join(f"{a}={s}:{e}" for a, s, e in zip(plan.dims, starts, stops, strict=True))
    return f"block {tuple(int(i) for i in location)} ({span})"


def _owner(plan: BlockPlan, voxel: Sequence[int]) -> tuple[int, ...]:
    """The block whose core holds a global voxel."""
    return tuple(
        int(np.searchsorted(np.cumsum(plan.chunks[a]), v, side="right"))
        for a, v in enumerate(voxel)
    )


@contextmanager
def _model_slot() -> Iterator[None]:
    """This process's model for one block; on a Dask worker the block leaves the worker's
    thread pool while it holds the model, so that the worker reads the next block and writes
    the last one meanwhile (one block in the model at a time, one more being read or written)."""
    try:
        from distributed import rejoin, secede
        from distributed.worker import thread_state

        in_worker = getattr(thread_state, "key", None) is not None
    except ImportError:  # pragma: no cover - distributed is a dependency
        in_worker = False
    turn = model_turn()
    turn.__enter__()  # wait for the model while holding a thread: at most one block waits
    try:
        if in_worker:
            secede()
        yield
    finally:
        # Hand the model on before rejoining: the thread that took our slot may be the next
        # block, waiting for the model.
        turn.__exit__(None, None, None)
        if in_worker:
            rejoin()


def _sums_block(
    x: np.ndarray,
    *,
    plan: BlockPlan,
    predictor: Predictor,
    window_kind: Window,
    overlap: float,
    tag: str,
    guide: np.ndarray | None = None,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    # block_info locations refer to the overlapped array: derive global offsets from the block
    # index and the plan's chunks, and check the halo dask attached.
    if block_info is None:  # dask passes it to every function that accepts it
        raise RuntimeError("map_overlap gave no block_info")
    location = block_info[0]["chunk-location"]
    starts, stops = _block_bounds(plan, location)
    for a in range(x.ndim):
        want = min(stops[a] + plan.depth[a], plan.shape[a]) - starts[a]
        if x.shape[a] != want:
            raise RuntimeError(
                f"block {tuple(location)} axis {plan.dims[a]}: got {x.shape[a]} voxels, expected "
                f"core {stops[a] - starts[a]} + halo {want - stops[a] + starts[a]}"
            )
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        # Name the block whose core holds the first bad voxel, whichever block's halo met it.
        first = np.argwhere(~np.isfinite(x))[0]
        owner = _owner(plan, [s + int(i) for s, i in zip(starts, first, strict=True)])
        raise BlockInputError(
            _where(plan, owner),
            "the input holds NaN or Inf values",
            "replace them (e.g. with the local median) and run again",
        )
    movie = [plan.dims.index(a) for a in MOVIE_AXES]
    moved = np.moveaxis(x, movie, (-3, -2, -1))
    images = None
    if guide is not None:  # the mean image over this region, its axes as the region's less t
        time = movie[0]
        crop = tuple(slice(starts[a], starts[a] + x.shape[a]) for a in range(x.ndim) if a != time)
        plane_axes = [a - (a > time) for a in movie[1:]]
        images = np.moveaxis(guide[crop], plane_axes, (-2, -1))
        if not np.isfinite(images).all():  # a NaN in a frame the mean image averages
            row, col = (int(v) for v in np.argwhere(~np.isfinite(images))[0][-2:])
            raise BlockInputError(
                _where(plan, location),
                f"the input holds NaN or Inf values in frames that the mean image of "
                f"{flag('guide')} averages (at y={starts[movie[1]] + row}, "
                f"x={starts[movie[2]] + col})",
                "replace them (e.g. with the local median) and run again",
            )
    planes = []
    report = functools.partial(count_patches, tag)
    for idx in np.ndindex(moved.shape[:-3]):
        with _model_slot():
            sums = block_sums(
                moved[idx],
                predictor=predictor,
                patch=plan.patch,
                overlap=overlap,
                place=Placement(
                    origin=[starts[a] for a in movie],
                    shape=[plan.shape[a] for a in movie],
                    core=[(starts[a], stops[a]) for a in movie],
                    mean_image=None if images is None else images[idx],
                ),
                window_kind=window_kind,
                progress=report,
            )
        planes.append(sums)
    # One plane (the usual case) needs no copy: its sums are the block's.
    out = (planes[0] if len(planes) == 1 else np.stack(planes)).reshape(moved.shape)
    bad = nonfinite_count(out)  # never write NaN/Inf and report success
    if bad:
        raise BlockDataError(
            _where(plan, location),
            f"the model's output holds {bad} NaN or Inf value(s) although the input is finite",
            "retrain the model (or use another one) and run again; nothing of this block "
            "was written",
        )
    return np.moveaxis(out, (-3, -2, -1), movie)


def _overlap_add(
    sums: str, spill: str, name: str, plan: BlockPlan, window_kind: Window, overlap: float
) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """Spill tasks (pieces of each block's sums past its high edges) and combine tasks."""
    halo_axes = [a for a, d in enumerate(plan.depth) if d]
    grid = plan.nblocks
    spills: dict[Any, Any] = {}
    layer: dict[Any, Any] = {}
    for index in np.ndindex(grid):
        index = tuple(int(i) for i in index)
        pieces, places = [], []
        for offsets in itertools.product((0, 1), repeat=len(halo_axes)):
            if not any(offsets):
                continue
            step = dict(zip(halo_axes, offsets, strict=True))
            # What this block spills into index + step ...
            target = tuple(i + step.get(a, 0) for a, i in enumerate(index))
            if all(t < n for t, n in zip(target, grid, strict=True)):
                key = (spill, *index, *offsets)
                cut = tuple(
                    slice(plan.chunks[a][i], None) if step.get(a) else slice(0, plan.chunks[a][i])
                    for a, i in enumerate(index)
                )
                spills[key] = Task(key, _cut, TaskRef((sums, *index)), cut)
            # ... and what its lower neighbour index - step spilled into it.
            source = tuple(i - step.get(a, 0) for a, i in enumerate(index))
            if all(s >= 0 for s in source):
                pieces.append(TaskRef((spill, *source, *offsets)))
                places.append(
                    tuple(
                        slice(0, plan.depth[a]) if step.get(a) else slice(None)
                        for a in range(len(index))
                    )
                )
        key = (name, *index)
        layer[key] = Task(
            key,
            _combine,
            TaskRef((sums, *index)),
            List(*pieces),
            tuple(places),
            plan=plan,
            index=index,
            window_kind=window_kind,
            overlap=overlap,
        )
    return spills, layer


def _cut(sums: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
    # Always a copy (np.ascontiguousarray would return a slice along t, the first axis, as a
    # view, which keeps the block's whole sums alive until the neighbour has run).
    return np.array(sums[region], order="C", copy=True)


def _combine(
    own: np.ndarray,
    pieces: Sequence[np.ndarray],
    places: Sequence[tuple[slice, ...]],
    *,
    plan: BlockPlan,
    index: tuple[int, ...],
    window_kind: Window,
    overlap: float,
) -> np.ndarray:
    """Overlap-add: a block's own sums over its core plus its lower neighbours' spills, / Σw."""
    starts, stops = _block_bounds(plan, index)
    core = tuple(slice(0, e - s) for s, e in zip(starts, stops, strict=True))
    # In place: the spill tasks read only the parts past the core (a received array may be
    # read-only, then it is copied).
    num = own[core] if own.flags.writeable else own[core].copy()
    for piece, place in zip(pieces, places, strict=True):
        num[place] += piece  # exact: every term is a small integer times a float32
    movie = [plan.dims.index(a) for a in MOVIE_AXES]
    sums = [
        weight_sums(
            plan.shape[a],
            plan.patch[plan.dims[a]],
            plan.stride[plan.dims[a]],
            window_kind,
            starts[a],
            stops[a],
        )
        for a in movie
    ]
    out = divide(np.moveaxis(num, movie, (-3, -2, -1)), sums)
    return np.moveaxis(out, (-3, -2, -1), movie)
