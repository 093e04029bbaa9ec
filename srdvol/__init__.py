"""srdvol: self-supervised SRDTrans denoising of terabyte OME-Zarr time series on Dask.

The public API is small and lazy:

- :func:`open` reads an OME-Zarr image (or plain Zarr array) as a lazy, labelled
  :class:`xarray.DataArray`;
- :func:`train` fits a model on a store without ground truth;
- :func:`denoise` returns the denoised image as a lazy array.

Heavy modules (torch, distributed) are imported only when these functions are called.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("srdvol")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "denoise", "open", "train"]

_LAZY = {
    "open": "srdvol.ngff.read",
    "train": "srdvol.training.loop",
    "denoise": "srdvol.dask.graph",
}
_TARGET = {"open": "open_image", "train": "train", "denoise": "denoise"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), _TARGET[name])
    raise AttributeError(f"module 'srdvol' has no attribute {name!r}")
