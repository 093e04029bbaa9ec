"""Predictors: what turns a batch of raw patches into denoised patches.

A *predictor* is a picklable callable taking a batch of raw patches, float32 ``(n, t, y, x)`` in
input intensity units, and returning denoised patches of the same shape and units. Three exist:

- :class:`AffineModel`, the pixel-wise stand-in ``scale * x + offset`` (known-answer tests, and the
  identity "model" of the engine benchmark);
- :class:`PatchMeanModel`, a stand-in whose output depends on where the patch sits (it adds the
  patch mean), used to prove that blocks blend seamlessly;
- :class:`ModelPredictor`, a trained SRDTrans model file.

:mod:`srdvol.predict.block` runs a predictor over the patches of one block (and of a whole
in-memory array, :func:`~srdvol.predict.block.predict_array`, still importable from here).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from srdvol.axes import MOVIE_AXES
from srdvol.errors import ConfigError, DataError, ModelMismatchError, StoreNotFoundError, flag

__all__ = [
    "MIN_FRAMES",
    "AffineModel",
    "ModelPredictor",
    "PatchMeanModel",
    "Predictor",
    "as_patch",
    "check_frames",
    "check_model",
    "load_cached",
]

#: The fewest frames a movie may have (the smallest patch_t the network accepts).
MIN_FRAMES = 16


class Predictor(Protocol):
    """Maps float32 patches ``(n, t, y, x)`` in input units to denoised patches, same shape.

    Optional attributes the engine reads: ``patch`` (its patch size, when ``denoise`` is given
    none) and ``batch_size`` (patches per call; 8 when absent or None).
    """

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
    batch_size
        Patches per call (the engine's default when None).
    """

    def __init__(
        self,
        scale: float = 1.0,
        offset: float = 0.0,
        *,
        delay: float = 0.0,
        batch_size: int | None = None,
    ) -> None:
        self.scale = float(scale)
        self.offset = float(offset)
        self.delay = float(delay)
        self.batch_size = batch_size

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        out = np.asarray(patches, dtype=np.float32)
        if self.scale == 1.0 and self.offset == 0.0:
            return out  # the identity costs nothing: the engine benchmark measures the engine
        out = out * np.float32(self.scale)
        out += np.float32(self.offset)
        return out

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
                flag("patch"),
                f"patch {values} does not have 3 sizes (t, y, x)",
                f"give it as T,Y,X, for example {flag('patch')} 32,64,64",
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


#: Patches per forward pass on a CPU (larger batches do not run faster there).
CPU_BATCH = 4
#: At most this many patches per forward pass on a GPU.
MAX_BATCH = 64
#: Share of a GPU's memory the activations of one forward pass may fill.
DEVICE_FRACTION = 0.4

_BATCHES: dict[tuple[Any, ...], int] = {}
_BATCH_LOCK = threading.Lock()


def device_batch(network: Any, shape: Sequence[int], *, amp: bool) -> int:
    """Patches per forward pass that fill a GPU's memory (:data:`CPU_BATCH` on a CPU).

    Two trial passes (1 and 2 patches of ``shape``) measure the activation memory per patch; the
    batch is the power of two that fills :data:`DEVICE_FRACTION` of the device's *total* memory
    (not the free memory, which varies between runs: a resumed run must batch as the first did,
    since kernels are chosen by shape), at most :data:`MAX_BATCH`.
    """
    import torch

    device = next(network.parameters()).device
    if device.type != "cuda":
        return CPU_BATCH

    def peak(n: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.zeros((n, 1, *shape), device=device)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp),
        ):
            network(x)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)

    one, two = peak(1), peak(2)
    per_patch = max(two - one, 1)
    fixed = max(one - per_patch, 0)
    total = torch.cuda.get_device_properties(device).total_memory
    fits = int((DEVICE_FRACTION * total - fixed) // per_patch)
    return min(MAX_BATCH, 2 ** int(np.log2(max(1, fits))))


class ModelPredictor:
    """A trained model file as a :class:`Predictor`.

    Only the path and settings are pickled; the network is loaded (once per process, see
    :func:`load_cached`) on first use. Patches are normalised with the model's global mean/std,
    run under ``torch.inference_mode`` (bf16 autocast on CUDA by default) and returned in input
    units. :meth:`predict_tensor` does the same for torch tensors already on
    :attr:`tensor_device`, so the engine keeps a block's patches on the GPU.

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
        so a patch's result does not depend on the patches it is batched with. None: as many
        as fill the GPU (:func:`device_batch`), :data:`CPU_BATCH` on a CPU.
    patch
        The patch size the engine will use; its t must equal the model's patch_t.
    normalization
        Mean and std (any object with ``mean`` and ``std``, e.g. a
        :class:`~srdvol.core.normalize.Statistics` of the input) to normalise with instead of
        the model's training statistics (``srdvol predict --renormalize``).
    tta
        Test-time augmentation (``--tta``): run every patch in the 8 symmetries of the (y, x)
        plane that training augments with, map each result back and average them (8x the
        network time). The network is not exactly equivariant to them, so the mean has less
        of its variance: higher SNR, cleaner pixel traces (benchmarks/RESULTS.md).
    anchor
        Gaussian sigma in pixels (``--anchor``): the output keeps the input's intensities at
        scales above it (:func:`~srdvol.predict.anchor.anchor_to_input`, applied to each patch
        after the network and ``tta``); 0, the default here, returns the network's output.
        With ``guide`` the correction is shaped like the mean image
        (:func:`~srdvol.predict.anchor.shape_of`; the command line's default sigma is then
        :data:`~srdvol.values.GUIDED_ANCHOR`).
    guide
        Window radius in pixels of the guided filter with the input's mean image
        (``--guide``, :mod:`srdvol.predict.guide`), applied to each patch after the network and
        ``tta`` and before ``anchor``; 0, the default, turns it off. The mean image comes with
        the patches (:func:`~srdvol.predict.block.block_sums` gathers it).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        device: str = "auto",
        autocast: bool | str = "auto",
        batch_size: int | None = None,
        patch: Sequence[int] | Mapping[str, int] | None = None,
        normalization: Any = None,
        tta: bool = False,
        anchor: float = 0.0,
        guide: int = 0,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.guide = int(guide)
        self.normalization = normalization
        self.tta = bool(tta)
        self.anchor = float(anchor)
        if not (math.isfinite(self.anchor) and self.anchor >= 0):
            raise ConfigError(
                flag("anchor"), f"{anchor} is not a finite sigma of 0 or more", "give e.g. 4"
            )
        self.device = device
        self.autocast = autocast
        self._batch_size = int(batch_size) if batch_size is not None else None
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
                flag("patch"),
                f"patch_t {self._patch['t']} differs from the model's patch_t {trained['t']} "
                f"({self.model_path})",
                f"use {flag('patch')} {trained['t']},{self._patch['y']},{self._patch['x']} or "
                "retrain",
            )
        return self._patch

    @property
    def tensor_device(self) -> Any:
        """The torch device the network runs on (loads the model)."""
        network, _ = load_cached(self.model_path, device=self.device)
        return next(network.parameters()).device

    def _amp(self) -> bool:
        device = self.tensor_device
        return device.type == "cuda" if self.autocast == "auto" else bool(self.autocast)

    @property
    def batch_size(self) -> int:
        """Patches per forward pass (measured on the device the first time when not given)."""
        if self._batch_size is not None:
            return self._batch_size
        network, _ = load_cached(self.model_path, device=self.device)
        shape = tuple(self.patch[a] for a in MOVIE_AXES)
        amp = self._amp()
        key = (*_file_key(self.model_path), str(self.tensor_device), shape, amp)
        with _BATCH_LOCK:  # not the model cache's lock: loading takes that one
            if key not in _BATCHES:
                _BATCHES[key] = device_batch(network, shape, amp=amp)
            return _BATCHES[key]

    def predict_tensor(self, patches: Any, guide: Any = None) -> Any:
        """Denoise float32 patches ``(n, t, y, x)``, a torch tensor on :attr:`tensor_device`;
        ``guide`` is the input's mean image over each patch, ``(n, y, x)`` (needed when
        :attr:`guide` is set)."""
        import torch

        network, record = load_cached(self.model_path, device=self.device)
        if patches.shape[1] != int(record.patch[0]):
            raise ModelMismatchError(
                flag("patch"),
                f"patches have {patches.shape[1]} frames but the model was trained "
                f"with patch_t {record.patch[0]} ({self.model_path})",
                f"use {flag('patch')} {record.patch[0]},Y,X",
            )
        stats = self.normalization if self.normalization is not None else record.normalization
        mean, std = float(stats.mean), float(stats.std)
        device = next(network.parameters()).device
        x = ((patches.to(device=device, dtype=torch.float32) - mean) / std).contiguous()
        if self.tta:
            from srdvol.model.symmetry import SYMMETRIES, dihedral, dihedral_inverse

            # A fixed order of float32 sums: the mean does not depend on the batch either.
            out = self._forward(network, dihedral(x, 0).contiguous())
            for k in range(1, SYMMETRIES):
                out += dihedral_inverse(self._forward(network, dihedral(x, k).contiguous()), k)
            out /= SYMMETRIES
        else:
            out = self._forward(network, x)
        if self.guide:
            from srdvol.predict.guide import guided_filter

            if guide is None:
                raise RuntimeError(
                    f"{self!r} needs the input's mean image with the patches; predict with "
                    "srdvol.predict.block.predict_array or srdvol.dask.denoise"
                )
            image = ((guide.to(device=device, dtype=torch.float32) - mean) / std)[:, None]
            radius = min(self.guide, out.shape[-2] - 1, out.shape[-1] - 1)
            out = image + guided_filter(out - image, image[:, 0], radius)
        if self.anchor:
            from srdvol.predict.anchor import anchor_to_input

            out = anchor_to_input(x, out, self.anchor, image[:, 0] if self.guide else None)
        return out * std + mean

    def _forward(self, network: Any, x: Any) -> Any:
        """The network on normalised patches ``(n, t, y, x)``, ``batch_size`` at a time."""
        import torch

        out = torch.empty_like(x)
        size = self.batch_size
        with (
            torch.inference_mode(),
            torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self._amp()),
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
                out[i : i + n] = network(part[:, None])[:n, 0].float()
        return out

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
        return self.predict_tensor(x.to(self.tensor_device)).cpu().numpy()

    def __repr__(self) -> str:
        own = "" if self.normalization is None else ", renormalized"
        own += ", tta" if self.tta else ""
        own += f", anchor={self.anchor:g}" if self.anchor else ""
        own += f", guide={self.guide}" if self.guide else ""
        return f"ModelPredictor({self.model_path!r}, device={self.device!r}{own})"


def __getattr__(name: str) -> Any:
    # predict_array moved to srdvol.predict.block (which imports this module); keep the old name.
    if name == "predict_array":
        from srdvol.predict.block import predict_array

        return predict_array
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
