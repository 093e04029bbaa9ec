"""What the data allow: estimators that know the simulated scene (issue 13, photons 0.5).

Issue 13's targets (SNR 3 dB above the best Gaussian, cell trace r above the best Gaussian's,
median transient gain 0.95-1.05, pixel r above the best Gaussian's) are met at photons 2 and 4
but not at 0.5. This script asks how far any estimator could go at a light level, by giving it
what no denoiser has: the simulator's own scene (:func:`srdvol.simulate.scene.build_scene`
rebuilt from the seed, checked against the truth store). Every row is scored like srdvol's:

- ``oracle masks, pooled``: each cell's photons summed over its label mask, spread over the
  mask like the noisy movie's mean image (the unbiased estimate of the cell's brightness when
  its activity follows its resting image; the maximum-likelihood one under Poisson noise);
  outside the masks the time average. ``oracle masks, Bayes``: the same with the posterior
  mean of the summed photons, the prior being that cell's own 256 true values.
- ``oracle footprints, unbiased``: every source's exact footprint known (somata with their
  dendrites, which share their activity; free processes; the three neuropil fields); each
  frame's brightness of every source by weighted least squares on the photon counts (weights
  ``1 / expected variance``: the best linear unbiased estimate, near the Cramér-Rao bound).
- ``oracle footprints, linear MMSE``: those estimates shrunk to each source's mean by its
  Wiener factor ``s² / (s² + v)`` (true variance over time, estimate's variance).
- ``oracle footprints, somata b``: free processes and neuropil as the linear MMSE; somata the
  unbiased estimate moved ``b`` of the way to their posterior mean under their own true values'
  prior (b = 1: the Bayes estimate, which flattens transients the most).

The somata's posterior means use the truth's values as prior, so these rows bound what a
method could reach without such knowledge; they are not methods. One JSON line per movie and
row on stdout, ``model`` tagged ``PHOTONS-SEED`` like ``inference.py``'s, readable by
``acceptance.py`` beside the ``quality.py`` runs that hold the same movies' baselines::

    python benchmarks/issue13/ceiling.py --photons 0.5 --seeds 0 1 2 > ceiling.jsonl
    python benchmarks/issue13/acceptance.py benchmarks/issue13/dim-850.json ceiling.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import gammaln

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import make_movie

from srdvol.simulate.scene import SceneConfig, build_scene

SCORES = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")


class KnownScene:
    """A movie's sources as columns ``B`` (photons per unit brightness) and brightnesses ``P``.

    A dendrite shares its soma's ΔF/F, so it joins its soma's column: one brightness per cell.
    """

    def __init__(self, photons: float, seed: int, frames: int, size: int) -> None:
        cfg = SceneConfig()
        scene = build_scene(
            frames=frames, zyx=(1, size, size), px=1.0, rate_hz=0.3, photons=photons,
            seed=seed, cfg=cfg,
        )  # fmt: skip
        footprints = scene.footprints[0].toarray() * scene.photon_scale
        traces, cells = scene.traces, scene.n_cells
        columns = [footprints[:, k].copy() for k in range(cells)]
        rows, free = [traces[k] for k in range(cells)], []
        for j in range(cells, len(traces)):
            ratio = traces[j] / traces[:cells]
            parent = np.flatnonzero(np.ptp(ratio, axis=1) <= 1e-9 * np.abs(ratio[:, 0]))
            if len(parent):  # a dendrite: its trace is its soma's, scaled
                columns[parent[0]] += footprints[:, j] * ratio[parent[0], 0]
            else:
                free.append(j)
        self.B = np.stack(columns + [footprints[:, j] for j in free], axis=1)
        self.P = np.stack(rows + [traces[j] for j in free])
        self.cells, self.cfg = cells, cfg

    def counts(self, movie: np.ndarray) -> np.ndarray:
        """Photons per pixel (rows) and frame (columns) of a movie in digital counts."""
        return ((movie.reshape(len(movie), -1) - self.cfg.offset) / self.cfg.gain).T

    def movie(self, brightness: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Digital counts of the sources at ``brightness`` (sources x frames)."""
        photons = (self.B @ brightness).T.reshape(shape)
        return (self.cfg.offset + self.cfg.gain * photons).astype(np.float32)


def posterior_mean(estimate: np.ndarray, variance: Any, prior: np.ndarray, poisson: bool) -> Any:
    """Mean of ``prior``'s values weighted by the likelihood of each ``estimate`` under them."""
    if poisson:
        loglik = estimate[:, None] * np.log(prior[None]) - prior[None]
        loglik -= gammaln(estimate[:, None] + 1)
    else:
        loglik = -0.5 * (estimate[:, None] - prior[None]) ** 2 / variance
    weights = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    return (weights * prior[None]).sum(axis=1) / weights.sum(axis=1)


def mask_rows(noisy: np.ndarray, truth: np.ndarray, masks: np.ndarray, cfg: SceneConfig) -> Any:
    """``oracle masks, pooled`` and ``oracle masks, Bayes``."""
    image = noisy.mean(axis=0)
    pooled = np.broadcast_to(image, noisy.shape).copy()
    bayes = pooled.copy()
    for label in np.unique(masks[masks > 0]):
        mask = masks == label
        counted = np.clip(((noisy[:, mask] - cfg.offset) / cfg.gain).sum(axis=1), 0, None)
        expected = ((truth[:, mask] - cfg.offset) / cfg.gain).sum(axis=1)
        shape = (image[mask] - cfg.offset) / (image[mask] - cfg.offset).sum()
        believed = posterior_mean(counted, None, expected, poisson=True)
        pooled[:, mask] = cfg.offset + cfg.gain * counted[:, None] * shape[None]
        bayes[:, mask] = cfg.offset + cfg.gain * believed[:, None] * shape[None]
    yield "oracle masks, pooled", pooled
    yield "oracle masks, Bayes", bayes


def footprint_rows(scene: KnownScene, noisy: np.ndarray, steps: list[float]) -> Any:
    """``oracle footprints, ...`` rows."""
    cfg, B, P = scene.cfg, scene.B, scene.P
    variance = B @ P.mean(axis=1) + (cfg.read_noise**2 + 1 / 12) / cfg.gain**2
    weighted = B / variance[:, None]
    inverse = np.linalg.inv(B.T @ weighted)
    unbiased = inverse @ (weighted.T @ scene.counts(noisy))
    spread = np.diag(inverse)  # each brightness estimate's variance
    mean = P.mean(axis=1, keepdims=True)
    wiener = mean + (P.var(axis=1) / (P.var(axis=1) + spread))[:, None] * (unbiased - mean)
    yield "oracle footprints, unbiased", scene.movie(unbiased, noisy.shape)
    yield "oracle footprints, linear MMSE", scene.movie(wiener, noisy.shape)
    cells = scene.cells
    bayes = np.stack(
        [posterior_mean(unbiased[k], spread[k], P[k], poisson=False) for k in range(cells)]
    )
    for step in steps:
        mixed = wiener.copy()
        mixed[:cells] = unbiased[:cells] + step * (bayes - unbiased[:cells])
        yield f"oracle footprints, somata b {step:g}", scene.movie(mixed, noisy.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.5, 1])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for photons in args.photons:
            for seed in args.seeds:
                movie = make_movie(
                    Path(tmp), photons=photons, seed=seed, frames=args.frames, size=args.size
                )
                scene = KnownScene(photons, seed, args.frames, args.size)
                expected = scene.movie(scene.P, movie.truth.shape)
                if not np.allclose(expected, movie.truth, atol=0.05):
                    raise SystemExit(f"the rebuilt scene of {photons:g}-{seed} is not the truth")
                rows = [*mask_rows(movie.noisy, movie.truth, movie.masks, scene.cfg)]
                rows += footprint_rows(scene, movie.noisy, args.steps)
                for name, estimate in rows:
                    scores = movie.score(estimate)
                    line = {"model": f"{photons:g}-{seed}", "method": name}
                    print(json.dumps(line | {k: scores[k] for k in SCORES}), flush=True)


if __name__ == "__main__":
    main()
