"""Variants of ``--restore`` scored on the acceptance movies, in numpy (issue 13).

For every model ``model-P-S.safetensors`` in ``WORKDIR`` (``benchmarks/quality.py --workdir
--keep``) the script predicts the network's own output once (``srdvol predict --anchor 0``,
kept as ``plain-P-S.zarr``), then runs :func:`srdvol.predict.restore.restore` on the whole movie
(one stretch: the movies have 256 frames) with the variants asked for and scores each against
the truth. A variant is ``radius/tile/rank/static_radius/static_eps`` (``static_radius``
``gS``: the network's mean plus the input's difference from it blurred by a Gaussian of
sigma ``S``, instead of the guided filter); srdvol's own setting is ``2/32/4/1/1e-3``.
One JSON line per model and variant::

    python benchmarks/issue13/restore_sweep.py /tmp/w --variants 2/32/4/1/1e-3 2/32/4/2/1e-3

The time mean of the restored movie is the static image exactly (the activity and the fitted
amplitude are zero-mean over the stretch), so the static image's variants change the SNR and
SSIM only, never the trace or pixel correlations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

import srdvol.predict.restore as restoring
from srdvol.core.metrics import evaluate
from srdvol.model.checkpoint import load_model
from srdvol.ngff.labels import read_masks
from srdvol.ngff.provenance import simulation_record
from srdvol.ngff.read import open_image

SCORES = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")


def _plain(workdir: Path, tag: str) -> np.ndarray:
    out = workdir / f"plain-{tag}.zarr"
    if not out.exists():
        srdvol = str(Path(sys.executable).with_name("srdvol"))
        command = [srdvol, "predict", str(workdir / f"noisy-{tag}.zarr"), str(out)]
        command += ["--model", str(workdir / f"model-{tag}.safetensors"), "--anchor", "0"]
        command += ["--workers", "1", "--dashboard-address", ":0"]
        subprocess.run(command, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return np.asarray(open_image(out).data, dtype=np.float32)


def _variant(
    noisy: np.ndarray, plain: np.ndarray, scale: float, spec: str, cache: dict
) -> np.ndarray:
    radius, tile, rank, static_radius, static_eps = spec.split("/")
    key = (radius, tile, rank)
    if key not in cache:  # the dynamic part: restored less its static image
        restoring.GUIDE_RADIUS = int(radius)
        out = restoring.restore(noisy, plain, scale=scale, rank=int(rank), tile=int(tile))
        cache[key] = out - out.mean(axis=0, dtype=np.float64).astype(np.float32)
    mean_in = noisy.mean(axis=0, dtype=np.float64) / scale
    mean_net = plain.mean(axis=0, dtype=np.float64) / scale
    if static_radius.startswith("g"):  # the network's mean, its bias taken out by a Gaussian
        smooth = ndimage.gaussian_filter(mean_in - mean_net, float(static_radius[1:]))
        static = (mean_net + smooth) * scale
    else:
        static = restoring._guided(mean_in, mean_net, int(static_radius), float(static_eps))
        static *= scale
    return cache[key] + static.astype(np.float32)


def _snr_db(estimate: np.ndarray, truth: np.ndarray, offset: float) -> float:
    """:func:`evaluate`'s SNR: each frame's, in dB, averaged over the frames."""
    signal = ((truth.astype(np.float64) - offset) ** 2).sum(axis=(1, 2))
    error = ((estimate.astype(np.float64) - truth) ** 2).sum(axis=(1, 2))
    return float(np.mean(10 * np.log10(signal / error)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--variants", nargs="+", default=["2/32/4/1/1e-3"])
    parser.add_argument("--models", nargs="+", default=None, help="tags P-S (default: all)")
    args = parser.parse_args()
    for model in sorted(args.workdir.glob("model-*.safetensors")):
        tag = model.name.removeprefix("model-").removesuffix(".safetensors")
        if args.models and tag not in args.models:
            continue
        truth_path = args.workdir / f"truth-{tag}.zarr"
        truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
        masks = read_masks(truth_path)
        offset = float((simulation_record(truth_path) or {}).get("offset", 0.0))
        noisy = np.asarray(open_image(args.workdir / f"noisy-{tag}.zarr").data, np.float32)
        plain = _plain(args.workdir, tag)
        scale = float(load_model(model)[1].normalization.std)
        cache: dict = {}
        scored: dict = {}
        for spec in args.variants:
            estimate = _variant(noisy, plain, scale, spec, cache)
            dynamic = tuple(spec.split("/")[:3])
            if dynamic in scored:  # the static image changes the SNR only (SSIM not scored)
                scores = scored[dynamic] | {
                    "snr_db": _snr_db(estimate, truth, offset),
                    "ssim": None,
                }
            else:
                scores = evaluate(estimate, truth, masks=masks, offset=offset)
                scored[dynamic] = scores
            line = {"model": tag, "variant": spec} | {k: scores[k] for k in SCORES}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
