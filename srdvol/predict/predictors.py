"""Predictors and the one-block prediction that the engine (and the in-memory path) run.

A *predictor* is a picklable callable taking a batch of raw patches, float32 ``(n, t, y, x)`` in
input intensity units, and returning denoised patches of the same shape and units. Three exist:

- :class:`AffineModel`, the pixel-wise stand-in ``scale * x + offset`` (known-answer tests, and the
  identity "model" of the engine benchmark);
- :class:`PatchMeanModel`, a stand-in whose output depends on where the patch sits (it adds the
  patch mean), used to prove that blocks blend seamlessly;
- :class:`ModelPredictor`, a trained SRDTrans model file.

:func:`predict_block` computes every lattice patch that touches a block's core and blends them;
:func:`predict_array` is the same over a whole in-memory array (the reference for the engine).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from srdvol.axes import MOVIE_AXES, parse_axes
from srdvol.core.blend import Accumulator
from srdvol.core.tiling import Window, lattice, stride, touching, window
from srdvol.errors import (
    ConfigError,
    DataError,
    InputError,
    ModelMismatchError,
    StoreNotFoundError,
)

__all__ = [
    "MIN_FRAMES",
    "AffineModel",
    "ModelPredictor",
    "PatchMeanModel",
    "Predictor",
    "as_patch",
    "check_frames",
    "check_model",
    "predict_array",
    "predict_block",
]

#: The fewest frames a movie may have (the smallest patch_t the network accepts).
MIN_FRAMES = 16


class Predictor(Protocol):
    """Maps float32 patches ``(n, t, y, x)`` in input units to denoised patches, same shape."""

    def __call__(self, patches: np.ndarray) -> np.ndarray: ...


class AffineModel:
    """Pixel-wise stand-in model: ``scale * x + offset``.

    Parameters
    ----------
    scale, offset
        The affine map (``AffineModel(2, 1)`` for known-answer tests, ``AffineModel()`` is the
        identity).
    delay
        Seconds to sleep per call, to imitate a slow model in resume tests.
    """

    def __init__(self, scale: float = 1.0, offset: float = 0.0, *, delay: float = 0.0) -> None:
        self.scale = float(scale)
        self.offset = float(offset)
        self.delay = float(delay)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        return (patches * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)

    def __repr__(self) -> str:
        return f"AffineModel(scale={self.scale}, offset={self.offset}, delay={self.delay})"


class PatchMeanModel:
    """Stand-in whose output depends on the patch position: ``x + weight * mean(patch)``.

    A block decomposition that used other patches than the whole-array pass would show steps at
    block borders with this model; the engine tests use it to show that it does not.
    """

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = float(weight)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        mean = patches.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
        return (patches + np.float32(self.weight) * mean.astype(np.float32)).astype(np.float32)


def as_patch(patch: Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """Normalise ``(t, y, x)`` or ``{"t":..,"y":..,"x":..}`` to a dict keyed by axis name."""
    if isinstance(patch, Mapping):
        out = {a: int(patch[a]) for a in MOVIE_AXES}
    else:
        values = tuple(int(v) for v in patch)
        if len(values) != 3:
            raise ConfigError(
                "--patch",
                f"patch {values} does not have 3 sizes (t, y, x)",
                "give it as T,Y,X, for example --patch 32,64,64",
            )
        out = dict(zip(MOVIE_AXES, values, strict=True))
    return out


def check_frames(frames: int, *, subject: str | None = None) -> None:
    """Raise :class:`DataError` if a movie has fewer than :data:`MIN_FRAMES` frames."""
    if frames < MIN_FRAMES:
        raise DataError(
            subject,
            f"the movie has {frames} frames, fewer than the {MIN_FRAMES} srdvol needs",
            f"denoise a time series with at least {MIN_FRAMES} frames",
        )


def predict_block(
    region: np.ndarray,
    *,
    predictor: Predictor,
    patch: Mapping[str, int] | Sequence[int],
    overlap: float,
    origin: Sequence[int],
    shape: Sequence[int],
    core: Sequence[tuple[int, int]],
    window_kind: Window | str = Window.TENT,
    batch_size: int | None = None,
) -> np.ndarray:
    """Denoise the core of one (t, y, x) block from its core plus halo.

    Parameters
    ----------
    region
        Raw values of the movie over a box starting at global ``origin``; it must contain every
        lattice patch that touches ``core`` (core plus a halo of ``patch - 1``, clipped to the
        movie, is always enough).
    predictor
        The model, see :class:`Predictor`.
    patch, overlap
        Patch size (t, y, x) and overlap fraction; they fix the global lattice.
    origin
        Global (t, y, x) index of ``region[0, 0, 0]``.
    shape
        Global (t, y, x) shape of the movie.
    core
        Global ``(start, stop)`` per axis of the voxels to return.
    window_kind
        Blending window (``"tent"`` or ``"cos2"``).
    batch_size
        Patches per predictor call (default: the predictor's ``batch_size`` attribute or 8).

    Returns
    -------
    numpy.ndarray
        float32 values of ``core``.
    """
    sizes = as_patch(patch)
    psize = tuple(sizes[a] for a in MOVIE_AXES)
    region = np.asarray(region, dtype=np.float32)
    pads, per_axis = [], []
    for a, p in enumerate(psize):
        length, start0 = int(shape[a]), int(origin[a])
        lo, hi = (int(v) for v in core[a])
        if length < p:
            # A short axis is reflect-padded to one patch; the block must hold the whole axis.
            if start0 != 0 or region.shape[a] != length:
                raise RuntimeError(
                    f"axis {MOVIE_AXES[a]} is shorter than the patch but the block "
                    f"does not hold all of it"
                )
            pads.append((0, p - length))
            starts = np.zeros(1, dtype=np.int64)
        else:
            pads.append((0, 0))
            starts = touching(lattice(length, p, stride(p, overlap)), p, lo, hi)
        local = starts - start0
        if local.size == 0 or local[0] < 0 or local[-1] + p > region.shape[a] + pads[-1][1]:
            raise RuntimeError(
                f"block region along {MOVIE_AXES[a]} ({start0}..{start0 + region.shape[a]}) does "
                f"not contain the lattice patches touching its core ({lo}..{hi})"
            )
        per_axis.append(local)
    if any(p[1] for p in pads):
        region = np.pad(region, pads, mode="reflect")
    # Accumulate only over the bounding box of the touching patches.
    box0 = [int(s[0]) for s in per_axis]
    box1 = [int(s[-1]) + p for s, p in zip(per_axis, psize, strict=True)]
    acc = Accumulator([b - a for a, b in zip(box0, box1, strict=True)])
    weight = window(psize, window_kind)
    batch = int(batch_size or getattr(predictor, "batch_size", None) or 8)
    corners = list(itertools.product(*per_axis))
    for i in range(0, len(corners), batch):
        group = corners[i : i + batch]
        patches = np.stack(
            [region[tuple(slice(c, c + p) for c, p in zip(cr, psize, strict=True))] for cr in group]
        )
        preds = np.asarray(predictor(patches), dtype=np.float32)
        if preds.shape != patches.shape:
            raise RuntimeError(f"predictor returned shape {preds.shape} for {patches.shape}")
        for cr, pred in zip(group, preds, strict=True):
            acc.add(
                pred,
                weight,
                tuple(slice(c - b, c - b + p) for c, b, p in zip(cr, box0, psize, strict=True)),
            )
    keep = tuple(
        slice(int(c[0]) - int(o) - b, int(c[1]) - int(o) - b)
        for c, o, b in zip(core, origin, box0, strict=True)
    )
    return acc.finalize_region(keep)


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
        As for :func:`predict_block`.
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
    out = np.empty(moved.shape, dtype=np.float32)
    shape = moved.shape[-3:]
    for idx in np.ndindex(moved.shape[:-3]):
        out[idx] = predict_block(
            moved[idx],
            predictor=predictor,
            patch=patch,
            overlap=overlap,
            origin=(0, 0, 0),
            shape=shape,
            core=[(0, n) for n in shape],
            window_kind=window_kind,
            batch_size=batch_size,
        )
    return np.moveaxis(out, (-3, -2, -1), movie_pos)


# ---------------------------------------------------------------------------------------------
# Trained models

_CACHE: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def _file_key(path: str) -> tuple[Any, ...]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreNotFoundError(
            path,
            "the model file does not exist",
            "give the path of a model written by srdvol train",
        ) from None
    except (OSError, ValueError):  # fsspec URLs: key by name only
        return (path,)
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cached(path: str | os.PathLike[str], *, device: str = "auto") -> tuple[Any, Any]:
    """Load ``(network, record)`` once per process and device (keyed by path, mtime and size).

    A Dask worker therefore reads the model file once, whatever the number of blocks it runs.
    """
    from srdvol.model.checkpoint import load_model

    path = os.fspath(path)
    dev = _resolve_device(device)
    key = (*_file_key(path), dev)
    with _CACHE_LOCK:
        if key not in _CACHE:
            network, record = load_model(path)
            network = network.to(dev).eval()
            _CACHE[key] = (network, record)
        return _CACHE[key]


#: Size (y, x) of the test input :func:`check_model` runs through the network.
CHECK_PLANE = (16, 16)


def check_model(model_path: str | os.PathLike[str], *, device: str = "cpu") -> Any:
    """Load a model file and run one small forward pass; refuse it unless the output is finite.

    Loading verifies the weights (checksum in the record, NaN/Inf; see
    :func:`srdvol.model.checkpoint.check_weights`); the forward pass on a fixed random input
    of ``(patch_t, 16, 16)`` in normalised units catches weights that are finite but damaged
    (an overflow to Inf). Run it before any block is written.

    Returns
    -------
    ModelRecord
        The model's record.

    Raises
    ------
    ModelMismatchError
        If the weights are damaged or the test output is not finite.
    StoreNotFoundError
        If the file does not exist.
    """
    import torch

    path = os.fspath(model_path)
    network, record = load_cached(path, device=device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1, record.network.patch_t, *CHECK_PLANE), generator=generator)
    with torch.inference_mode():
        y = network(x.to(next(network.parameters()).device))
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).sum())
        raise ModelMismatchError(
            path,
            f"the model gives {bad} NaN or Inf value(s) on a small test input, so its weights "
            "are damaged",
            "copy the model again from where it was trained, or retrain",
        )
    return record


class ModelPredictor:
    """A trained model file as a :class:`Predictor`.

    Only the path and settings are pickled; the network is loaded (once per process, see
    :func:`load_cached`) on first use. Patches are normalised with the model's global mean/std,
    run under ``torch.inference_mode`` (bf16 autocast on CUDA by default) and returned in input
    units.

    Parameters
    ----------
    model_path
        Model file written by ``srdvol train``.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    autocast
        ``"auto"`` (bf16 on CUDA, off on CPU), ``True`` or ``False``.
    batch_size
        Patches per forward pass; every pass has exactly this many (a short batch is padded),
        so a patch's result does not depend on the patches it is batched with.
    patch
        The patch size the engine will use; its t must equal the model's patch_t.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        device: str = "auto",
        autocast: bool | str = "auto",
        batch_size: int = 4,
        patch: Sequence[int] | Mapping[str, int] | None = None,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.device = device
        self.autocast = autocast
        self.batch_size = int(batch_size)
        self._patch = as_patch(patch) if patch is not None else None

    @property
    def record(self) -> Any:
        """The model's record (loads the model on this process's device if needed)."""
        return load_cached(self.model_path, device=self.device)[1]

    @property
    def patch(self) -> dict[str, int]:
        """Patch size (t, y, x): the one given, else the one the model was trained with."""
        trained = as_patch(tuple(self.record.patch))
        if self._patch is None:
            return trained
        if self._patch["t"] != trained["t"]:
            raise ModelMismatchError(
                "--patch",
                f"patch_t {self._patch['t']} differs from the model's patch_t {trained['t']} "
                f"({self.model_path})",
                f"use --patch {trained['t']},{self._patch['y']},{self._patch['x']} or retrain",
            )
        return self._patch

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        import torch

        network, record = load_cached(self.model_path, device=self.device)
        if patches.shape[1] != int(record.patch[0]):
            raise ModelMismatchError(
                "--patch",
                f"patches have {patches.shape[1]} frames but the model was trained "
                f"with patch_t {record.patch[0]} ({self.model_path})",
                f"use --patch {record.patch[0]},Y,X",
            )
        mean = float(record.normalization.mean)
        std = float(record.normalization.std)
        device = next(network.parameters()).device
        use_amp = device.type == "cuda" if self.autocast == "auto" else bool(self.autocast)
        x = torch.from_numpy(np.ascontiguousarray((patches - mean) / std, dtype=np.float32))
        out = np.empty(patches.shape, dtype=np.float32)
        size = self.batch_size
        with (
            torch.inference_mode(),
            torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp),
        ):
            for i in range(0, len(x), size):
                # Every forward pass gets exactly batch_size patches (a short batch is padded
                # with copies of its last patch): the CPU convolution (oneDNN) takes another
                # code path for a batch of one, and kernels are chosen by shape, so a patch's
                # last bits would otherwise depend on how many patches shared its call, that
                # is, on the block size.
                part = x[i : i + size]
                n = len(part)
                if n < size:
                    part = torch.cat([part, part[-1:].expand(size - n, *part.shape[1:])])
                y = network(part[:, None].to(device))[:n, 0]
                out[i : i + n] = y.float().cpu().numpy()
        return (out * std + mean).astype(np.float32)

    def __repr__(self) -> str:
        return f"ModelPredictor({self.model_path!r}, device={self.device!r})"
