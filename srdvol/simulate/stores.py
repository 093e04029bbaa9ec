"""Synthetic calcium imaging written to OME-Zarr stores, chunk by chunk, with its ground truth.

Stores: OUT holds the noisy uint16 image, TRUTH the float32 truth and a label image of the cells
at ``TRUTH/labels/cells`` (NGFF image-label, int32, axes (z,) y, x; 0 = background, cell ``k`` has
label ``k``, the pixels where that cell's footprint dominates inside its outline). The scene and
the noise model: :mod:`srdvol.simulate.scene`. Frames are the unit of generation, so only one
slab of chunks (plus the static footprints) is ever in memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from srdvol.errors import flag
from srdvol.options import SimulateOptions, merge, refuse_unknown
from srdvol.simulate.scene import (
    Scene,
    SceneConfig,
    build_scene,
    frame_block,
    noisy_frame,
    render_frames,
)

__all__ = ["SimulationInfo", "simulate"]


@dataclass(frozen=True)
class SimulationInfo:
    """What :func:`simulate` wrote.

    Attributes
    ----------
    out, truth
        Paths of the noisy and the ground-truth stores.
    dims, shape
        Axis names and shape of both images (``("t", "y", "x")`` or ``("t", "z", "y", "x")``).
    chunks
        Storage chunks of the noisy image.
    n_cells
        Number of somata (labels 1..n_cells in ``TRUTH/labels/cells``).
    photons, gain, offset, read_noise
        Noise model (see the module docstring).
    rate_hz, pixel_size_um, seed
        Acquisition rate, pixel size and seed.
    scene
        The :class:`SceneConfig` values used, as a dict.
    """

    out: str
    truth: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    n_cells: int
    photons: float
    gain: float
    offset: float
    read_noise: float
    rate_hz: float
    pixel_size_um: float
    seed: int
    scene: dict[str, Any] = field(default_factory=dict)


def _like(
    scene: Scene,
    kind: str,
    *,
    dims: tuple[str, ...],
    rate_hz: float,
    px: float,
    dz: float,
    seed: int,
    cfg: SceneConfig,
    frames: int,
) -> Any:
    """A lazy DataArray of the simulated image, one dask chunk per frame (what create_output
    copies: dims, scale, units; it samples one frame for the viewer's contrast window)."""
    import dask.array as da
    import xarray as xr

    nz, ny, nx = scene.shape_zyx
    planes = "z" in dims
    chunks = ((1,) * frames, (1,) * nz, (ny,), (nx,)) if planes else ((1,) * frames, (ny,), (nx,))
    dtype = np.uint16 if kind == "noisy" else np.float32
    data = da.map_blocks(
        frame_block,
        scene,
        kind,
        seed,
        cfg,
        planes=planes,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0,) * len(dims), dtype),
    )
    scale = {"t": 1.0 / rate_hz, "z": dz, "y": px, "x": px}
    units = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
    shape = data.shape
    coords = {d: np.arange(n) * scale[d] for d, n in zip(dims, shape, strict=True)}
    attrs = {
        "axes_units": {d: units[d] for d in dims},
        "scale": {d: scale[d] for d in dims},
        "translation": dict.fromkeys(dims, 0.0),
    }
    return xr.DataArray(data, dims=dims, coords=coords, attrs=attrs, name=kind)


def _create_image(
    path: str,
    *,
    like: Any,
    chunks: dict[str, int] | None,
    provenance: dict[str, Any],
    overwrite: bool,
) -> Any:
    """Create an OME-Zarr 0.5 image of ``like``'s dtype through
    :func:`srdvol.ngff.write.create_output`."""
    from srdvol.ngff.write import create_output
    from srdvol.options import OutputOptions

    return create_output(
        path,
        like=like,
        options=OutputOptions(dtype="input", ngff="0.5", overwrite=overwrite),
        chunks=chunks,
        provenance=provenance,
        name=str(like.name),  # "noisy" or "truth", also the viewer's channel label
    )


def _write_labels(
    truth: str, labels: np.ndarray, dims: tuple[str, ...], px: float, dz: float
) -> None:
    """Write the cell label image as an NGFF image-label at ``TRUTH/labels/cells``."""
    from srdvol.ngff.labels import write_labels

    spatial = tuple(d for d in dims if d != "t")
    write_labels(
        truth,
        (labels if "z" in spatial else labels[0]).astype(np.int32),
        name="cells",
        axes=spatial,
        scale=[dz if d == "z" else px for d in spatial],
        units=dict.fromkeys(spatial, "micrometer"),
    )


def _check_target(path: str, record: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse, before writing anything, a store that is not this very simulation's output."""
    import json

    from srdvol.errors import OutputExistsError
    from srdvol.ngff.write import read_provenance

    if overwrite or not os.path.exists(path):
        return
    existing = (read_provenance(path) or {}).get("simulation")
    if existing != json.loads(json.dumps(record)):
        raise OutputExistsError(
            path,
            "already exists and is not the output of this simulation",
            f"choose another path or pass {flag('overwrite')} to replace it",
        )


def _slabs(length: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def simulate(
    out: str | os.PathLike[str],
    *,
    truth: str | os.PathLike[str],
    options: SimulateOptions | None = None,
    chunks: dict[str, int] | None = None,
    scene: SceneConfig | None = None,
    **changes: Any,
) -> SimulationInfo:
    """Write a noisy synthetic calcium-imaging movie and its ground truth as OME-Zarr 0.5.

    Parameters
    ----------
    out
        Path of the noisy image (uint16, axes t,y,x or t,z,y,x).
    truth
        Path of the ground truth (float32, same axes and shape, ``E[noisy]`` including the
        offset) with the cell labels at ``labels/cells``.
    options
        :class:`~srdvol.options.SimulateOptions`: ``frames``; ``planes`` (z planes, ``None``
        writes a (t, y, x) movie); ``size`` (y, x) in pixels; ``rate_hz`` (the time scale is
        ``1 / rate_hz`` seconds: at 0.3 Hz the calcium transients, decay ~0.8 s, are much
        shorter than the frame interval, so consecutive frames are nearly independent);
        ``photons`` (mean expected photons per pixel and frame over the field of view at rest,
        default :data:`~srdvol.options.DEFAULT_PHOTONS`: a noisy SNR of a few dB);
        ``seed`` (the scene and the noise; the output is identical for any ``chunks``);
        ``pixel_size_um``; ``overwrite`` (replace existing stores).
    chunks
        Storage chunks by axis name (``{"t": 16, "y": 128, "x": 128}``); ``None`` uses srdvol's
        output defaults.
    scene
        Tissue and microscope parameters (:class:`~srdvol.simulate.scene.SceneConfig`); the
        defaults model GCaMP6f in mouse cortex with a photon-counting detector.
    **changes
        Changes to ``options`` by field name (``frames=32, size=(64, 64)``).

    Returns
    -------
    SimulationInfo
        Paths, shape, chunks, number of cells and the noise model.

    Raises
    ------
    ConfigError
        If a size, rate or photon budget is not positive (naming it).
    """
    options = merge(options, SimulateOptions, changes)
    refuse_unknown(changes, "a simulation option")
    cfg = scene or SceneConfig()
    frames, planes, rate_hz, seed = options.frames, options.planes, options.rate_hz, options.seed
    photons = float(options.photons)
    ny, nx = options.size
    pixel_size_um, overwrite = options.pixel_size_um, options.overwrite
    from srdvol.ngff.write import check_output_path

    check_output_path(truth, out)  # neither store may be, or lie inside, the other
    nz = 1 if planes is None else int(planes)
    dims = ("t", "y", "x") if planes is None else ("t", "z", "y", "x")
    shape = (frames, ny, nx) if planes is None else (frames, nz, ny, nx)
    px = float(pixel_size_um)
    built = build_scene(
        frames=frames,
        zyx=(nz, ny, nx),
        px=px,
        rate_hz=rate_hz,
        photons=photons,
        seed=seed,
        cfg=cfg,
    )
    model = {
        "dims": list(dims),
        "shape": list(shape),
        "photons": photons,
        "gain": cfg.gain,
        "offset": cfg.offset,
        "read_noise": cfg.read_noise,
        "rate_hz": rate_hz,
        "pixel_size_um": px,
        "seed": seed,
        "n_cells": built.n_cells,
        "scene": asdict(cfg),
    }
    for path, role in ((out, "noisy"), (truth, "truth")):
        _check_target(os.fspath(path), {**model, "role": role}, overwrite=overwrite)
    common = {
        "dims": dims,
        "rate_hz": rate_hz,
        "px": px,
        "dz": cfg.plane_spacing_um,
        "seed": seed,
        "cfg": cfg,
        "frames": frames,
    }
    noisy_arr = _create_image(
        os.fspath(out),
        like=_like(built, "noisy", **common),
        chunks=chunks,
        overwrite=overwrite,
        provenance={"command": "simulate", "simulation": {**model, "role": "noisy"}},
    )
    truth_arr = _create_image(
        os.fspath(truth),
        like=_like(built, "truth", **common),
        chunks=chunks,
        overwrite=overwrite,
        provenance={"command": "simulate", "simulation": {**model, "role": "truth"}},
    )
    _write_labels(os.fspath(truth), built.labels, dims, px, cfg.plane_spacing_um)
    # Write whole shards (or chunks) of both arrays: slabs of t x z that cover full frames.
    step_t = _write_unit(noisy_arr, truth_arr, axis=0)
    step_z = 1 if planes is None else _write_unit(noisy_arr, truth_arr, axis=1)
    for t0, t1 in _slabs(frames, step_t):
        for z0, z1 in _slabs(nz, step_z):
            expected = np.stack([render_frames(built, t0, t1, z) for z in range(z0, z1)], axis=1)
            noisy = np.empty(expected.shape, np.uint16)
            for i in range(t1 - t0):
                for j in range(z1 - z0):
                    noisy[i, j] = noisy_frame(
                        expected[i, j], seed=seed, t=t0 + i, z=z0 + j, cfg=cfg
                    )
            exact = (cfg.offset + cfg.gain * expected).astype(np.float32)
            where = (slice(t0, t1),) if planes is None else (slice(t0, t1), slice(z0, z1))
            if planes is None:
                noisy, exact = noisy[:, 0], exact[:, 0]
            noisy_arr[where] = noisy
            truth_arr[where] = exact
    return SimulationInfo(
        out=os.fspath(out),
        truth=os.fspath(truth),
        dims=dims,
        shape=shape,
        chunks=tuple(noisy_arr.chunks),
        n_cells=built.n_cells,
        photons=photons,
        gain=cfg.gain,
        offset=cfg.offset,
        read_noise=cfg.read_noise,
        rate_hz=rate_hz,
        pixel_size_um=px,
        seed=seed,
        scene=asdict(cfg),
    )


def _write_unit(a: Any, b: Any, *, axis: int) -> int:
    """Slab length along ``axis`` covering whole write units (shards, else chunks) of both."""
    units = []
    for arr in (a, b):
        shards = getattr(arr, "shards", None)
        units.append((shards or arr.chunks)[axis])
    return math.lcm(*units)
