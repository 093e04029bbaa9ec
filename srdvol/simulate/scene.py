"""Synthetic two-photon calcium imaging with its ground truth, written chunk by chunk.

The scene is a field of GCaMP-labelled somata (ellipsoids with a dim nucleus), thin processes
(blurred random curves, half of them dendrites that share their soma's activity), and a smooth,
slowly varying neuropil. Each source has a fixed spatial footprint (blurred by a Gaussian PSF) and
a trace: Poisson burst events convolved with a double-exponential calcium kernel, sampled at the
volume rate. The expected photon image of frame ``t`` is ``footprints @ traces[:, t]``.

Noise model (documented because evaluation depends on it)::

    noisy = clip(round(offset + gain * Poisson(photons_tzyx) + Normal(0, read_noise)), 0, 65535)
    truth = offset + gain * photons_tzyx                       (float32, = E[noisy] before clipping)

``photons`` sets the *mean* number of photons per pixel and frame over the field of view at rest
(no activity, neuropil at its mean), so active cells are brighter than that. The truth therefore
carries the same offset as the noisy data: a perfect denoiser (one returning E[noisy]) scores
perfectly. SNR in :mod:`srdvol.core.metrics` subtracts the ``offset`` recorded in the truth store's
``srdvol.simulation`` attributes so the constant does not inflate it.

Determinism: the scene (cells, processes, neuropil, all traces) comes from ``seed`` alone, and the
noise of frame ``t`` in plane ``z`` from ``SeedSequence(seed, spawn_key=(1, t, z))``. Frames are the
unit of generation, so the result is identical for any storage chunking, and only one slab of
chunks (plus the static footprints) is ever in memory.

Stores: OUT holds the noisy uint16 image, TRUTH the float32 truth and a label image of the cells
at ``TRUTH/labels/cells`` (NGFF image-label, int32, axes (z,) y, x; 0 = background, cell ``k`` has
label ``k``, the pixels where that cell's footprint dominates inside its outline).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, signal, sparse

from srdvol.errors import ConfigError

__all__ = ["DEFAULT_PHOTONS", "SceneConfig", "SimulationInfo", "simulate"]

#: Default photon budget: mean photons per pixel and frame at rest (noisy SNR about 2 dB).
DEFAULT_PHOTONS = 1.0
#: Spawn-key prefixes keep the scene stream and the per-frame noise streams apart.
_SCENE_KEY = 0
_NOISE_KEY = 1


@dataclass(frozen=True)
class SceneConfig:
    """Physical parameters of the synthetic tissue and microscope (defaults: mouse cortex, GCaMP6).

    Parameters
    ----------
    cell_density
        Somata per 100 x 100 µm² per plane.
    soma_radius_um
        Mean soma radius (µm); each cell's two in-plane radii vary by ~15 %.
    nucleus_dimming
        Fraction of brightness missing at the nucleus centre (GCaMP is excluded from the nucleus).
    process_density
        Processes per 100 x 100 µm² per plane.
    process_length_um
        Mean length of a process (µm).
    dendrite_fraction
        Fraction of processes that share their soma's activity; the rest are independent axons.
    neuropil_level
        Neuropil brightness relative to a resting soma.
    neuropil_scale_um
        Spatial correlation length of the neuropil (µm).
    neuropil_time_s
        Correlation time of the neuropil's slow fluctuations (s).
    event_rate_hz
        Median rate of calcium events per source (s⁻¹), log-normally spread across sources.
    spike_dff
        ΔF/F of one spike at the kernel peak; an event has 1 + Geometric(0.5) spikes.
    rise_s, decay_s
        Rise and decay time constants of the calcium kernel (GCaMP6f-like).
    psf_sigma_um
        Lateral Gaussian PSF sigma (µm).
    plane_spacing_um
        Distance between z planes (µm), used for the soma's z extent.
    gain
        Digital counts per detected photon.
    offset
        Digital counts added to every pixel (detector baseline).
    read_noise
        Standard deviation of the Gaussian read noise (counts).
    """

    cell_density: float = 30.0
    soma_radius_um: float = 6.0
    nucleus_dimming: float = 0.6
    process_density: float = 12.0
    process_length_um: float = 60.0
    dendrite_fraction: float = 0.5
    neuropil_level: float = 0.25
    neuropil_scale_um: float = 12.0
    neuropil_time_s: float = 30.0
    event_rate_hz: float = 0.15
    spike_dff: float = 0.4
    rise_s: float = 0.07
    decay_s: float = 0.8
    psf_sigma_um: float = 0.8
    plane_spacing_um: float = 8.0
    gain: float = 10.0
    offset: float = 100.0
    read_noise: float = 5.0


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


@dataclass
class _Scene:
    """Static footprints (one sparse (pixels, sources) matrix per plane) and all traces."""

    shape_zyx: tuple[int, int, int]
    footprints: list[sparse.csr_matrix]
    traces: np.ndarray  # (sources, frames) float64, multiplies the footprints
    labels: np.ndarray  # (z, y, x) int32
    n_cells: int
    photon_scale: float  # footprint units -> photons


# --------------------------------------------------------------------------- scene construction


def _soma_footprints(
    rng: np.random.Generator, cfg: SceneConfig, zyx: tuple[int, int, int], px: float
) -> tuple[list[list[tuple[int, np.ndarray, np.ndarray]]], np.ndarray, np.ndarray]:
    """Place somata; return per-cell lists of (z, flat pixel index, value), labels and centres."""
    nz, ny, nx = zyx
    area = ny * nx * px * px / 1e4
    n = max(1, round(cfg.cell_density * area * nz))
    cy = rng.uniform(0, ny, n)
    cx = rng.uniform(0, nx, n)
    cz = rng.uniform(-0.5, nz - 0.5, n) if nz > 1 else np.zeros(n)
    radii = cfg.soma_radius_um / px * rng.normal(1.0, 0.15, (n, 2)).clip(0.6, 1.5)
    angle = rng.uniform(0, np.pi, n)
    rz = cfg.soma_radius_um / cfg.plane_spacing_um
    sigma = cfg.psf_sigma_um / px
    best = np.zeros(zyx, np.float32)
    labels = np.zeros(zyx, np.int32)
    cells: list[list[tuple[int, np.ndarray, np.ndarray]]] = []
    for k in range(n):
        parts = []
        for z in range(nz):
            dz = (z - cz[k]) / rz if nz > 1 else 0.0
            if abs(dz) >= 1.0:
                continue
            shrink = math.sqrt(1.0 - dz * dz)
            half = math.ceil(radii[k].max() * shrink + 4 * sigma + 2)
            y0, y1 = max(0, int(cy[k]) - half), min(ny, int(cy[k]) + half + 1)
            x0, x1 = max(0, int(cx[k]) - half), min(nx, int(cx[k]) + half + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
            u, v = yy + 0.5 - cy[k], xx + 0.5 - cx[k]
            c, s = math.cos(angle[k]), math.sin(angle[k])
            r = np.hypot((c * u + s * v) / radii[k, 0], (c * v - s * u) / radii[k, 1]) / shrink
            # Soft outline and a dim nucleus; the PSF blur is applied to the whole footprint.
            body = 1.0 / (1.0 + np.exp((r - 1.0) / 0.08))
            body *= 1.0 - cfg.nucleus_dimming * np.exp(-((r / 0.45) ** 2))
            value = ndimage.gaussian_filter(body, sigma, mode="constant")
            inside = (r < 1.0) & (value > best[z, y0:y1, x0:x1])
            labels[z, y0:y1, x0:x1][inside] = k + 1
            best[z, y0:y1, x0:x1][inside] = value[inside]
            keep = value > 1e-3
            flat = (yy[keep].astype(np.int64)) * nx + xx[keep].astype(np.int64)
            parts.append((z, flat, value[keep]))
        cells.append(parts)
    centres = np.stack([cz, cy, cx], axis=1)
    return cells, labels, centres


def _process_footprints(
    rng: np.random.Generator,
    cfg: SceneConfig,
    zyx: tuple[int, int, int],
    px: float,
    centres: np.ndarray,
) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], np.ndarray]:
    """Draw thin processes as persistent random walks; return footprints and parent cell (-1)."""
    nz, ny, nx = zyx
    area = ny * nx * px * px / 1e4
    n = max(1, round(cfg.process_density * area * nz))
    sigma = max(cfg.psf_sigma_um / px, 0.6)
    out: list[tuple[int, np.ndarray, np.ndarray]] = []
    parents: list[int] = []
    for _ in range(n):
        parent = -1
        if rng.random() < cfg.dendrite_fraction:
            parent = int(rng.integers(len(centres)))
            z = int(np.clip(round(centres[parent, 0]), 0, nz - 1))
            y, x = centres[parent, 1], centres[parent, 2]
        else:
            z, y, x = int(rng.integers(nz)), rng.uniform(0, ny), rng.uniform(0, nx)
        steps = max(4, int(rng.exponential(cfg.process_length_um / px) / 0.5))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.08, steps))
        ys = y + 0.5 * np.cumsum(np.sin(heading))
        xs = x + 0.5 * np.cumsum(np.cos(heading))
        ok = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
        if not ok.any():
            continue
        iy, ix = ys[ok].astype(np.int64), xs[ok].astype(np.int64)
        y0, y1 = max(0, iy.min() - 4), min(ny, iy.max() + 5)
        x0, x1 = max(0, ix.min() - 4), min(nx, ix.max() + 5)
        img = np.zeros((y1 - y0, x1 - x0))
        np.add.at(img, (iy - y0, ix - x0), 1.0)
        img = ndimage.gaussian_filter(np.minimum(img, 2.0), sigma, mode="constant")
        img /= img.max()
        keep = img > 1e-3
        yy, xx = np.nonzero(keep)
        out.append((z, (yy + y0) * nx + (xx + x0), img[keep]))
        parents.append(parent)
    return out, np.asarray(parents, np.int64)


def _neuropil(
    rng: np.random.Generator,
    cfg: SceneConfig,
    zyx: tuple[int, int, int],
    px: float,
    frames: int,
    rate_hz: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Three smooth positive spatial fields per volume and their slow temporal coefficients."""
    m = 3
    fields = rng.normal(size=(m, *zyx))
    sig = cfg.neuropil_scale_um / px
    for i in range(m):
        fields[i] = ndimage.gaussian_filter(fields[i], (0.0, sig, sig), mode="wrap")
        fields[i] = np.exp(0.4 * fields[i] / (fields[i].std() + 1e-12))
        fields[i] *= cfg.neuropil_level / (m * fields[i].mean())
    slow = rng.normal(size=(m, frames))
    tau = max(cfg.neuropil_time_s * rate_hz, 0.5)
    slow = ndimage.gaussian_filter1d(slow, tau, axis=1, mode="wrap")
    # Unit variance from the filter's theory, not the sample: short movies stay well scaled.
    slow = 1.0 + 0.15 * slow * math.sqrt(2.0 * math.sqrt(math.pi) * tau)
    return fields, np.clip(slow, 0.2, None)


def _calcium_traces(
    rng: np.random.Generator, cfg: SceneConfig, n: int, frames: int, rate_hz: float
) -> np.ndarray:
    """ΔF/F of ``n`` sources at the frame times: Poisson burst events, double-exponential kernel."""
    dt = 1.0 / rate_hz
    lead = 10.0 * cfg.decay_s  # start early so frame 0 sees the steady state
    duration = frames * dt + lead
    rates = cfg.event_rate_hz * rng.lognormal(0.0, 0.5, n)
    counts = rng.poisson(rates * duration)
    source = np.repeat(np.arange(n), counts)
    times = rng.uniform(-lead, frames * dt, counts.sum())
    amp = cfg.spike_dff * rng.geometric(0.5, counts.sum())  # spikes per event >= 1
    frame = np.clip(np.ceil(times / dt).astype(np.int64), 0, frames - 1)
    keep = times <= (frames - 1) * dt
    source, times, amp, frame = source[keep], times[keep], amp[keep], frame[keep]
    lag = frame * dt - times  # >= 0: time from the event to the first frame that sees it
    # Normalise the kernel exp(-t/decay) - exp(-t/rise) to a peak of 1.
    tp = math.log(cfg.decay_s / cfg.rise_s) * cfg.decay_s * cfg.rise_s / (cfg.decay_s - cfg.rise_s)
    peak = math.exp(-tp / cfg.decay_s) - math.exp(-tp / cfg.rise_s)
    dff = np.zeros((n, frames))
    for tau, sign in ((cfg.decay_s, 1.0), (cfg.rise_s, -1.0)):
        impulses = np.zeros((n, frames))
        np.add.at(impulses, (source, frame), sign * amp * np.exp(-lag / tau) / peak)
        dff += signal.lfilter([1.0], [1.0, -math.exp(-dt / tau)], impulses, axis=1)
    return np.maximum(dff, 0.0)


def _build_scene(
    *,
    frames: int,
    zyx: tuple[int, int, int],
    px: float,
    rate_hz: float,
    photons: float,
    seed: int,
    cfg: SceneConfig,
) -> _Scene:
    """Everything that does not depend on the noise: footprints, traces, labels, photon scale."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SCENE_KEY,)))
    nz, ny, nx = zyx
    cells, labels, centres = _soma_footprints(rng, cfg, zyx, px)
    procs, parents = _process_footprints(rng, cfg, zyx, px, centres)
    fields, slow = _neuropil(rng, cfg, zyx, px, frames, rate_hz)
    n_cells, n_proc = len(cells), len(procs)
    brightness = rng.lognormal(0.0, 0.3, n_cells)
    proc_brightness = 0.5 * rng.lognormal(0.0, 0.3, n_proc)
    dff = _calcium_traces(rng, cfg, n_cells + n_proc, frames, rate_hz)
    dendrite = parents >= 0
    dff[n_cells:][dendrite] = dff[parents[dendrite]]
    traces = np.concatenate(
        [
            brightness[:, None] * (1 + dff[:n_cells]),
            proc_brightness[:, None] * (1 + dff[n_cells:]),
            slow,
        ],
        axis=0,
    )
    n_src = traces.shape[0]
    rows: list[list[np.ndarray]] = [[] for _ in range(nz)]
    cols: list[list[np.ndarray]] = [[] for _ in range(nz)]
    vals: list[list[np.ndarray]] = [[] for _ in range(nz)]
    for k, parts in enumerate(cells):
        for z, flat, value in parts:
            rows[z].append(flat)
            cols[z].append(np.full(flat.size, k))
            vals[z].append(value)
    for j, (z, flat, value) in enumerate(procs):
        rows[z].append(flat)
        cols[z].append(np.full(flat.size, n_cells + j))
        vals[z].append(value)
    pixels = ny * nx
    footprints = []
    for z in range(nz):
        for i in range(fields.shape[0]):
            rows[z].append(np.arange(pixels))
            cols[z].append(np.full(pixels, n_cells + n_proc + i))
            vals[z].append(fields[i, z].ravel())
        mat = sparse.coo_matrix(
            (np.concatenate(vals[z]), (np.concatenate(rows[z]), np.concatenate(cols[z]))),
            shape=(pixels, n_src),
        ).tocsr()
        footprints.append(mat)
    rest = np.concatenate([brightness, proc_brightness, np.ones(fields.shape[0])])
    mean_rest = np.mean([(fp @ rest).mean() for fp in footprints])
    return _Scene(zyx, footprints, traces, labels, n_cells, photons / mean_rest)


def _render_frames(scene: _Scene, t0: int, t1: int, z: int) -> np.ndarray:
    """Expected photons of frames ``t0:t1`` of plane ``z``, shape (t1 - t0, y, x), float64."""
    _, ny, nx = scene.shape_zyx
    block = scene.footprints[z] @ scene.traces[:, t0:t1]
    return (scene.photon_scale * block.T).reshape(t1 - t0, ny, nx)


def _noisy_frame(
    expected: np.ndarray, *, seed: int, t: int, z: int, cfg: SceneConfig
) -> np.ndarray:
    """One noisy uint16 frame from its expected photons, with its own seeded stream."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NOISE_KEY, t, z)))
    counts = rng.poisson(expected).astype(np.float64)
    value = cfg.offset + cfg.gain * counts + rng.normal(0.0, cfg.read_noise, expected.shape)
    return np.clip(np.rint(value), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------- stores


def _frame_block(
    scene: _Scene, kind: str, seed: int, cfg: SceneConfig, *, planes: bool, block_info: Any = None
) -> np.ndarray:
    """One (1, [1,] y, x) block of the lazy noisy or truth image (used for metadata samples)."""
    loc = block_info[None]["array-location"]
    t, z = loc[0][0], (loc[1][0] if planes else 0)
    expected = _render_frames(scene, t, t + 1, z)[0]
    if kind == "noisy":
        frame: np.ndarray = _noisy_frame(expected, seed=seed, t=t, z=z, cfg=cfg)
    else:
        frame = (cfg.offset + cfg.gain * expected).astype(np.float32)
    return frame.reshape((1, 1, *frame.shape) if planes else (1, *frame.shape))


def _like(
    scene: _Scene,
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
        _frame_block,
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
            "choose another path or pass --overwrite to replace it",
        )


def _slabs(length: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def simulate(
    out: str | os.PathLike[str],
    *,
    truth: str | os.PathLike[str],
    frames: int = 128,
    planes: int | None = None,
    size: tuple[int, int] = (128, 128),
    rate_hz: float = 0.3,
    photons: float | None = None,
    seed: int = 0,
    chunks: dict[str, int] | None = None,
    pixel_size_um: float = 1.0,
    overwrite: bool = False,
    scene: SceneConfig | None = None,
) -> SimulationInfo:
    """Write a noisy synthetic calcium-imaging movie and its ground truth as OME-Zarr 0.5.

    Parameters
    ----------
    out
        Path of the noisy image (uint16, axes t,y,x or t,z,y,x).
    truth
        Path of the ground truth (float32, same axes and shape, ``E[noisy]`` including the
        offset) with the cell labels at ``labels/cells``.
    frames
        Number of time points.
    planes
        Number of z planes; ``None`` writes a (t, y, x) movie.
    size
        Frame size (y, x) in pixels.
    rate_hz
        Volume rate; the time scale is ``1 / rate_hz`` seconds. At the default 0.3 Hz the calcium
        transients (decay ~0.8 s) are much shorter than the frame interval, so consecutive frames
        are nearly independent.
    photons
        Mean expected photons per pixel and frame over the field of view at rest (no activity).
        Default :data:`DEFAULT_PHOTONS` (noisy SNR of a few dB, the low-SNR regime of the paper).
    seed
        Seed of the scene and of the noise; the output is identical for any ``chunks``.
    chunks
        Storage chunks by axis name (``{"t": 16, "y": 128, "x": 128}``); ``None`` uses srdvol's
        output defaults.
    pixel_size_um
        Pixel size in micrometer (y and x).
    overwrite
        Replace existing stores at ``out`` and ``truth``.
    scene
        Tissue and microscope parameters (:class:`SceneConfig`); the defaults model GCaMP6f in
        mouse cortex with a photon-counting detector.

    Returns
    -------
    SimulationInfo
        Paths, shape, chunks, number of cells and the noise model.

    Raises
    ------
    ConfigError
        If a size, rate, photon budget or pixel size is not positive.
    """
    cfg = scene or SceneConfig()
    photons = DEFAULT_PHOTONS if photons is None else float(photons)
    ny, nx = (int(v) for v in size)
    checks = {
        "--frames": frames >= 1,
        "--planes": planes is None or planes >= 1,
        "--size": ny >= 1 and nx >= 1,
        "--rate-hz": rate_hz > 0 and math.isfinite(rate_hz),
        "--photons": photons > 0 and math.isfinite(photons),
        "pixel_size_um": pixel_size_um > 0,
    }
    for option, ok in checks.items():
        if not ok:
            raise ConfigError(option, "must be a positive number", f"give a positive {option}")
    from srdvol.ngff.write import check_output_path

    check_output_path(truth, out)  # neither store may be, or lie inside, the other
    nz = 1 if planes is None else int(planes)
    dims = ("t", "y", "x") if planes is None else ("t", "z", "y", "x")
    shape = (frames, ny, nx) if planes is None else (frames, nz, ny, nx)
    px = float(pixel_size_um)
    built = _build_scene(
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
            expected = np.stack([_render_frames(built, t0, t1, z) for z in range(z0, z1)], axis=1)
            noisy = np.empty(expected.shape, np.uint16)
            for i in range(t1 - t0):
                for j in range(z1 - z0):
                    noisy[i, j] = _noisy_frame(
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
