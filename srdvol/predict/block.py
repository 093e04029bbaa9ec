"""Prediction of one block: the patches it owns, their weighted sums, and the in-memory pass.

A block predicts the lattice patches whose start lies in its core, each once, and returns
``Σ w·pred`` (float64) over its core plus the high-side halo those patches reach into
(:func:`block_sums`). The engine adds the parts past the core into the neighbouring blocks and
divides by ``Σ w`` (:mod:`srdvol.core.blend`). :func:`predict_array` is the same over a whole
in-memory array: one block that owns every patch.

The region is moved to the predictor's device once (a GPU for a :class:`ModelPredictor` there),
patches are gathered and their weighted predictions added there, in float64, and only the sums
come back: patches never cross the bus. Because every weight is a small integer, every sum is
exact and the device does not change a bit of it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from srdvol.axes import MOVIE_AXES, parse_axes
from srdvol.core.blend import divide, weight_sums
from srdvol.core.tiling import Window, lattice, owned, stride, window
from srdvol.errors import InputError
from srdvol.predict.guide import mean_image
from srdvol.predict.predictors import Predictor, as_patch, check_frames

__all__ = [
    "BlocksStopped",
    "Placement",
    "block_sums",
    "model_turn",
    "predict_array",
    "stop_blocks",
]

#: One block in the model at a time per process (a worker has one device): a second block that
#: is ready waits here with its input read, while other threads read and write.
_MODEL_LOCK = threading.Lock()

#: Set when this worker process closes: the block in the model parks at its next batch. A block
#: holds the model in a seceded thread, which the worker's close does not wait for, and a
#: process that exits while a thread is inside torch dies in C++ with "terminate called without
#: an active exception" on the user's terminal. Parked (outside torch), the thread goes down with
#: the process, and the scheduler reruns its block elsewhere as for any worker that leaves.
_CLOSING = threading.Event()
_PARKED = threading.Event()


class BlocksStopped(RuntimeError):
    """A parked block was let go without its process closing (tests); nothing was written."""


def stop_blocks(timeout: float) -> bool:
    """Park this process's block at its next batch; wait up to ``timeout`` seconds until no
    block is inside the model. True when none is."""
    import time

    _CLOSING.set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _PARKED.is_set():
            return True
        if _MODEL_LOCK.acquire(timeout=0.05):
            _MODEL_LOCK.release()
            return True
    return False


def _park() -> None:
    """Wait outside torch while this process closes (:func:`stop_blocks`)."""
    import time

    _PARKED.set()
    while _CLOSING.is_set():
        time.sleep(0.1)
    raise BlocksStopped("this block was parked while its worker closed")


@contextmanager
def model_turn() -> Iterator[None]:
    """Hold this process's model for one block's forward passes (blocks take turns)."""
    with _MODEL_LOCK:
        yield


def _device_of(predictor: Any) -> Any:
    import torch

    device = getattr(predictor, "tensor_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class Placement(NamedTuple):
    """Where a block's region lies in its movie, all global (t, y, x) indices.

    Attributes
    ----------
    origin
        Index of the region's first voxel.
    shape
        Shape of the whole movie.
    core
        ``(start, stop)`` per axis: the block predicts the lattice patches that start there.
    mean_image
        The movie's mean image (:func:`srdvol.predict.guide.mean_image` of the whole movie)
        over the region's (y, x), for a predictor with ``guide`` set (``--guide``); each patch
        gets its part.
    """

    origin: Sequence[int]
    shape: Sequence[int]
    core: Sequence[tuple[int, int]]
    mean_image: np.ndarray | None = None


def block_sums(
    region: np.ndarray,
    *,
    predictor: Predictor,
    patch: Mapping[str, int] | Sequence[int],
    overlap: float,
    place: Placement,
    window_kind: Window | str = Window.TENT,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``Σ w·pred`` of the lattice patches whose start lies in ``core``, over ``region``.

    Parameters
    ----------
    region
        Raw values of the (t, y, x) movie over a box starting at ``place.origin``; it must hold
        every patch the core owns (core plus ``patch - 1`` on the high side, clipped to the
        movie). An axis shorter than the patch must be held whole; it is reflect-padded.
    predictor
        The model, see :class:`~srdvol.predict.predictors.Predictor`. One with a
        ``predict_tensor`` method (a :class:`~srdvol.predict.predictors.ModelPredictor`) gets
        torch tensors on its ``tensor_device``.
    patch, overlap
        Patch size (t, y, x) and overlap fraction; they fix the global lattice.
    place
        Where ``region`` lies in the movie and which patches it predicts (its core).
    window_kind
        Blending window (``"tent"`` or ``"cos2"``).
    batch_size
        Patches per predictor call (default: the predictor's ``batch_size`` attribute or 8).
    progress
        Called with the number of patches after each predictor call.

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``region``; zero where no owned patch reaches.
    """
    import torch

    sizes = as_patch(patch)
    psize = tuple(sizes[a] for a in MOVIE_AXES)
    origin, shape, core, guide = place
    pads, per_axis = [], []
    for a, p in enumerate(psize):
        length, start0 = int(shape[a]), int(origin[a])
        lo, hi = (int(v) for v in core[a])
        if length < p:
            if start0 != 0 or region.shape[a] != length:
                raise RuntimeError(
                    f"axis {MOVIE_AXES[a]} is shorter than the patch but the block "
                    f"does not hold all of it"
                )
            pads.append((0, p - length))
            starts = owned(np.zeros(1, dtype=np.int64), lo, hi)
        else:
            pads.append((0, 0))
            starts = owned(lattice(length, p, stride(p, overlap)), lo, hi)
        local = starts - start0
        if local.size and (local[0] < 0 or local[-1] + p > region.shape[a] + pads[-1][1]):
            raise RuntimeError(
                f"block region along {MOVIE_AXES[a]} ({start0}..{start0 + region.shape[a]}) does "
                f"not hold the lattice patches starting in its core ({lo}..{hi})"
            )
        per_axis.append([int(s) for s in local])
    if not all(per_axis):
        return np.zeros(region.shape, dtype=np.float64)
    values = np.asarray(region)
    if any(p[1] for p in pads):
        values = np.pad(values, pads, mode="reflect")
    device = _device_of(predictor)
    tensor_path = hasattr(predictor, "predict_tensor")
    image = None
    if getattr(predictor, "guide", 0):
        if guide is None or tuple(guide.shape) != tuple(region.shape[1:]):
            raise RuntimeError(
                f"{predictor!r} needs the mean image over the region's (y, x) "
                f"{tuple(region.shape[1:])}, got {None if guide is None else guide.shape}"
            )
        padded = np.pad(np.asarray(guide, dtype=np.float32), pads[1:], mode="reflect")
        image = torch.from_numpy(padded).to(device)
    # The region stays in its own dtype (half the bytes of float32 for uint16); each batch of
    # patches is converted as it is gathered, as the whole region converted first would be.
    x = torch.from_numpy(np.ascontiguousarray(values)).to(device)
    if device.type == "cpu":
        num = torch.from_numpy(np.zeros(values.shape))  # zero pages, mapped as they are added to
    else:
        num = torch.zeros(values.shape, dtype=torch.float64, device=device)
    weight = torch.from_numpy(window(psize, window_kind)).to(device)
    batch = int(batch_size or getattr(predictor, "batch_size", None) or 8)
    corners = list(itertools.product(*per_axis))  # lattice order
    # Batches are gathered into buffers reused for the whole block: a fresh allocation of this
    # size per batch is a fresh mmap (and page faults) where malloc trims eagerly (Dask workers).
    gathered = torch.empty((min(batch, len(corners)), *psize), dtype=x.dtype, device=device)
    converted = (
        gathered if x.dtype == torch.float32 else torch.empty_like(gathered, dtype=torch.float32)
    )
    for i in range(0, len(corners), batch):
        if _CLOSING.is_set():
            _park()
        group = corners[i : i + batch]
        boxes = [
            tuple(slice(c, c + p) for c, p in zip(corner, psize, strict=True)) for corner in group
        ]
        torch.stack([x[box] for box in boxes], out=gathered[: len(group)])
        patches = converted[: len(group)]
        if converted is not gathered:
            patches.copy_(gathered[: len(group)])
        if image is not None:
            crops = torch.stack([image[box[1:]] for box in boxes])
            preds = predictor.predict_tensor(patches, crops)  # type: ignore[attr-defined]
        elif tensor_path:
            preds = predictor.predict_tensor(patches)  # type: ignore[attr-defined]
        else:
            preds = torch.from_numpy(
                np.asarray(predictor(patches.cpu().numpy()), dtype=np.float32)
            ).to(device)
        if tuple(preds.shape) != tuple(patches.shape):
            raise RuntimeError(f"predictor returned shape {tuple(preds.shape)} for {patches.shape}")
        for box, pred in zip(boxes, preds, strict=True):
            # float64, fused (no temporary): exact for integer weights (see tiling)
            num[box].addcmul_(pred, weight)
        if progress is not None:
            progress(len(group))
    crop = tuple(slice(0, n) for n in region.shape)
    return num[crop].cpu().numpy()


def predict_array(
    array: np.ndarray,
    predictor: Predictor,
    *,
    patch: Mapping[str, int] | Sequence[int],
    overlap: float = 0.25,
    dims: str | Sequence[str] | None = None,
    window_kind: Window | str = Window.TENT,
    batch_size: int | None = None,
) -> np.ndarray:
    """Denoise a whole in-memory array in one pass (each (c, z) plane is its own movie).

    Parameters
    ----------
    array
        numpy array with axes ``dims`` (default ``"tyx"`` for a 3-D array).
    predictor
        The model.
    patch, overlap, window_kind, batch_size
        As for :func:`block_sums`.
    dims
        Axis names in array order, e.g. ``"tzyx"``.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape and axis order.
    """
    array = np.asarray(array)
    if dims is None and array.ndim != 3:
        raise InputError(
            "dims", f"a {array.ndim}-D array needs axis names", "pass dims, for example dims='tzyx'"
        )
    names = parse_axes(dims if dims is not None else "tyx", subject="dims")
    if len(names) != array.ndim:
        raise InputError(
            "dims", f"{len(names)} axis names for a {array.ndim}-D array", "give one name per axis"
        )
    movie_pos = [names.index(a) for a in MOVIE_AXES]
    moved = np.moveaxis(array, movie_pos, (-3, -2, -1))
    check_frames(moved.shape[-3])
    sizes = as_patch(patch)
    shape = moved.shape[-3:]
    sums = [
        weight_sums(n, sizes[a], stride(sizes[a], overlap), window_kind)
        for a, n in zip(MOVIE_AXES, shape, strict=True)
    ]
    out = np.empty(moved.shape, dtype=np.float32)
    guided = bool(getattr(predictor, "guide", 0))
    for idx in np.ndindex(moved.shape[:-3]):
        with model_turn():
            num = block_sums(
                moved[idx],
                predictor=predictor,
                patch=sizes,
                overlap=overlap,
                place=Placement(
                    (0, 0, 0),
                    shape,
                    [(0, n) for n in shape],
                    mean_image(moved[idx]) if guided else None,
                ),
                window_kind=window_kind,
                batch_size=batch_size,
            )
        out[idx] = divide(num, sums)
    return np.moveaxis(out, (-3, -2, -1), movie_pos)
