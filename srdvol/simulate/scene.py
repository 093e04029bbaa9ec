"""The simulated scene: cells, processes, neuropil, their calcium traces, and noisy frames.

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

The stores are written by :mod:`srdvol.simulate.stores`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, signal, sparse

__all__ = [
    "SceneConfig",
    "build_scene",
    "frame_block",
    "noisy_frame",
    "render_frames",
]

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


@dataclass
class Scene:
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
        # centred first: on a frame much smaller than the fields' scale the filtered field is
        # nearly constant, and exp(0.4 mean / tiny std) overflowed (the normalisation below
        # cancels the centring's constant factor)
        centred = fields[i] - fields[i].mean()
        fields[i] = np.exp(0.4 * centred / (centred.std() + 1e-12))
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


def build_scene(
    *,
    frames: int,
    zyx: tuple[int, int, int],
    px: float,
    rate_hz: float,
    photons: float,
    seed: int,
    cfg: SceneConfig,
) -> Scene:
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
    return Scene(zyx, footprints, traces, labels, n_cells, photons / mean_rest)


def render_frames(scene: Scene, t0: int, t1: int, z: int) -> np.ndarray:
    """Expected photons of frames ``t0:t1`` of plane ``z``, shape (t1 - t0, y, x), float64."""
    _, ny, nx = scene.shape_zyx
    block = scene.footprints[z] @ scene.traces[:, t0:t1]
    return (scene.photon_scale * block.T).reshape(t1 - t0, ny, nx)


def noisy_frame(expected: np.ndarray, *, seed: int, t: int, z: int, cfg: SceneConfig) -> np.ndarray:
    """One noisy uint16 frame from its expected photons, with its own seeded stream."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NOISE_KEY, t, z)))
    counts = rng.poisson(expected).astype(np.float64)
    value = cfg.offset + cfg.gain * counts + rng.normal(0.0, cfg.read_noise, expected.shape)
    return np.clip(np.rint(value), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------- stores


def frame_block(
    scene: Scene, kind: str, seed: int, cfg: SceneConfig, *, planes: bool, block_info: Any = None
) -> np.ndarray:
    """One (1, [1,] y, x) block of the lazy noisy or truth image (used for metadata samples)."""
    loc = block_info[None]["array-location"]
    t, z = loc[0][0], (loc[1][0] if planes else 0)
    expected = render_frames(scene, t, t + 1, z)[0]
    if kind == "noisy":
        frame: np.ndarray = noisy_frame(expected, seed=seed, t=t, z=z, cfg=cfg)
    else:
        frame = (cfg.offset + cfg.gain * expected).astype(np.float32)
    return frame.reshape((1, 1, *frame.shape) if planes else (1, *frame.shape))
