"""Shared pytest fixtures: small OME-Zarr images written by ome-zarr itself, store digests.

``make_image`` writes a real OME-Zarr image (NGFF 0.4 on Zarr v2 or 0.5 on Zarr v3) with
ome-zarr-py's own writer, so srdvol's reader is tested against what other tools produce::

    def test_something(make_image):
        path, data = make_image(axes="tzyx", shape=(16, 2, 32, 32), ngff="0.4")

``make_plain_array`` writes a Zarr array without OME metadata. ``store_digest(path)`` hashes
every file under a store, to prove that a run left its input unchanged.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import settings

# CI explores the same examples on every run (a red CI then means a real regression, and the
# example can be replayed); local runs keep drawing new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

with warnings.catch_warnings():
    # ome-zarr 0.18 instantiates its deprecated Scaler class at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Every test starts with this process's SIGINT/SIGTERM handlers and leaves them so.

    Importing ``dask_jobqueue`` replaces Python's Ctrl-C handler with one that calls
    ``sys.exit()`` (its ``runner`` module does so at import), and a test that leaked it made the
    interrupt tests of later modules see SystemExit instead of Ctrl-C.
    """
    # A test that starts srdvol in a subprocess passes on what it finds here: an ignored or
    # blocked SIGINT/SIGTERM (left by a library, seen only in full-suite runs) would make the
    # child ignore the signal the test sends it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)


_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}


def _test_data(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.normal(100.0, 10.0, size=shape).astype(dtype)
    if kind in "iu":
        return rng.integers(0, 1000, size=shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    raise ValueError(f"no test data for dtype {dtype}")


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., tuple[str, np.ndarray]]:
    """Factory writing an OME-Zarr image with ome-zarr's ``write_image``.

    Call ``make_image(name="in.zarr", *, axes="tyx", shape=(16, 32, 32), dtype="uint16",
    ngff="0.5", scale=None, units=None, translation=None, chunks=None, levels=1, seed=0,
    data=None)``; returns ``(path, data)`` where ``data`` is the numpy level-0 content.
    ``scale``/``translation``/``units`` are dicts keyed by axis name (units default to seconds and
    micrometers, scale to 1). ``levels > 1`` writes a 2x y/x pyramid with ome-zarr.
    """

    def factory(
        name: str = "in.zarr",
        *,
        axes: str = "tyx",
        shape: tuple[int, ...] = (16, 32, 32),
        dtype: str = "uint16",
        ngff: str = "0.5",
        scale: dict[str, float] | None = None,
        units: dict[str, str] | None = None,
        translation: dict[str, float] | None = None,
        chunks: tuple[int, ...] | None = None,
        levels: int = 1,
        seed: int = 0,
        data: np.ndarray | None = None,
    ) -> tuple[str, np.ndarray]:
        if data is None:
            data = _test_data(shape, dtype, seed)
        path = str(tmp_path / name)
        v3 = ngff == "0.5"
        group = zarr.open_group(path, mode="w-", zarr_format=3 if v3 else 2)
        scale = {a: 1.0 for a in axes} | (scale or {})
        units = {a: _UNITS[a] for a in axes if a != "c"} if units is None else units
        options: dict[str, Any] = {}
        if chunks is not None:
            options["chunks"] = chunks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            write_image(
                data,
                group,
                axes=axes,
                fmt=FormatV05() if v3 else FormatV04(),
                scale_factors=[2] * (levels - 1),
                scale=scale,
                axes_units=units,
                storage_options=options,
            )
        if translation:
            _set_translation(group, axes, translation, v3=v3)
        return path, data

    return factory


def _set_translation(
    group: zarr.Group, axes: str, translation: dict[str, float], *, v3: bool
) -> None:
    """Add ``translation`` to every level's transform (ome-zarr's writer cannot set one)."""
    attrs = dict(group.attrs)
    container = attrs["ome"] if v3 else attrs
    for dataset in container["multiscales"][0]["datasets"]:
        transforms = [t for t in dataset["coordinateTransformations"] if t["type"] == "scale"]
        previous = [
            t["translation"]
            for t in dataset["coordinateTransformations"]
            if t["type"] == "translation"
        ]
        base = previous[0] if previous else [0.0] * len(axes)
        shift = [b + translation.get(a, 0.0) for a, b in zip(axes, base, strict=True)]
        transforms.append({"type": "translation", "translation": shift})
        dataset["coordinateTransformations"] = transforms
    if v3:
        group.attrs["ome"] = container
    else:
        group.attrs["multiscales"] = container["multiscales"]


@pytest.fixture
def make_plain_array(tmp_path: Path) -> Callable[..., tuple[str, np.ndarray]]:
    """Factory writing a plain Zarr array (no OME metadata): ``(name, *, shape, dtype,
    zarr_format=3, chunks=None, seed=0) -> (path, data)``."""

    def factory(
        name: str = "plain.zarr",
        *,
        shape: tuple[int, ...] = (16, 32, 32),
        dtype: str = "uint16",
        zarr_format: int = 3,
        chunks: tuple[int, ...] | None = None,
        seed: int = 0,
    ) -> tuple[str, np.ndarray]:
        data = _test_data(shape, dtype, seed)
        path = str(tmp_path / name)
        array = zarr.create_array(
            path, shape=shape, dtype=data.dtype, chunks=chunks or shape, zarr_format=zarr_format
        )
        array[...] = data
        return path, data

    return factory


def digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 over every file's relative name and bytes under ``path``."""
    hasher = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        hasher.update(str(file.relative_to(root)).encode())
        hasher.update(file.read_bytes())
    return hasher.hexdigest()


@pytest.fixture
def store_digest() -> Callable[[str | os.PathLike[str]], str]:
    """Return a function hashing every file under a store (to show an input is unchanged)."""
    return digest


# ---- the NGFF layer's parametrised set: every NGFF version x every way of holding pixels


@pytest.fixture(params=["0.4", "0.5"])
def ngff(request: pytest.FixtureRequest) -> str:
    """Each NGFF version srdvol reads and writes: 0.4 (Zarr v2) and 0.5 (Zarr v3)."""
    return str(request.param)


@pytest.fixture(params=["numpy", "dask"])
def backend(request: pytest.FixtureRequest) -> str:
    """How an image's pixels are held: in memory (numpy) or lazily (dask)."""
    return str(request.param)


def held_as(image: Any, backend: str) -> Any:
    """``image`` (a DataArray) with its pixels loaded into numpy, or kept as dask."""
    import dask.array as da

    if backend == "numpy":
        loaded = image.copy(data=np.asarray(image.data))
        assert isinstance(loaded.data, np.ndarray)
        return loaded
    assert isinstance(image.data, da.Array)
    return image


def validate_ngff(path: str | os.PathLike[str]) -> Any:
    """Validate a store with ome-zarr-models (the version its Zarr format implies) and read
    every level back with ome-zarr's Reader; return the ome-zarr-models ``Image``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader
        from ome_zarr_models import v04, v05

    group = zarr.open_group(os.fspath(path), mode="r")
    models = v05 if group.metadata.zarr_format == 3 else v04
    image = models.Image.from_zarr(group)
    paths = [d.path for d in image.ome_attributes.multiscales[0].datasets]
    nodes = list(Reader(parse_url(os.fspath(path), mode="r"))())
    assert nodes, "ome-zarr's Reader found no image"
    assert [tuple(level.shape) for level in nodes[0].data] == [group[p].shape for p in paths]
    return image


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from srdvol.model.config import NetworkConfig
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("tiny-model")
    from srdvol.simulate import simulate

    simulate(root / "noisy.zarr", truth=root / "truth.zarr", frames=16, size=(32, 32), seed=2)
    model = root / "tiny.safetensors"
    train(
        root / "noisy.zarr",
        model,
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )
    return model


@pytest.fixture(scope="module")
def one_worker():
    from srdvol.dask.cluster import open_cluster

    with open_cluster(gpus="none", workers=1, threads_per_worker=1, dashboard_address=None) as c:
        yield c
