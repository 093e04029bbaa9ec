"""A self-supervised amplitude calibration of srdvol's output (issue 13, an experiment).

For each model named on the command line (``model-P-S.safetensors`` in WORKDIR, with the
movie and truth ``benchmarks/quality.py --workdir`` leaves beside it), every pixel is
predicted with its own value replaced by the mean of its four neighbours (four passes, one per
2x2 phase): that estimate is independent of the pixel's own noise, so the mean of the noisy
pixel given the estimate is the truth's. A monotone map (256 quantile bins) from the estimate's
deviation from its temporal mean to the noisy pixel's is fitted over the whole movie and
applied to the output. Prints one JSON line per variant (the plain output, the masked
estimate, both calibrated): scores and the cell-trace diagnostics of ``inference.py``.

Run from the repository root, one thread::

    python benchmarks/issue13/calibration.py /tmp/srdvol-short-budget/tmp_XXXX 4-1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import OFFSET, trace_diagnostics

from srdvol.core.metrics import evaluate
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor

PATCH = (32, 64, 64)
BINS = 256


def masked_estimate(noisy: np.ndarray, predictor: ModelPredictor) -> np.ndarray:
    """Each pixel predicted with its own value replaced by its four neighbours' mean."""
    out = np.empty_like(noisy)
    pad = np.pad(noisy, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    vertical = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1]
    neighbours = 0.25 * (vertical + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:])
    for i in range(2):
        for j in range(2):
            masked = noisy.copy()
            masked[:, i::2, j::2] = neighbours[:, i::2, j::2]
            predicted = predict_array(masked, predictor, patch=PATCH, overlap=0.25)
            out[:, i::2, j::2] = predicted[:, i::2, j::2]
    return out


def fit_map(deviation: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean target per quantile bin of ``deviation``, made non-decreasing."""
    edges = np.quantile(deviation, np.linspace(0, 1, BINS + 1))
    index = np.clip(np.searchsorted(edges, deviation, side="right") - 1, 0, BINS - 1).ravel()
    count = np.maximum(np.bincount(index, minlength=BINS), 1)
    x = np.bincount(index, deviation.ravel(), BINS) / count
    y = np.bincount(index, target.ravel(), BINS) / count
    return x, np.maximum.accumulate(y)


def apply_map(deviation: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The fitted map, continued with slope 1 beyond the bins."""
    beyond = np.where(deviation > x[-1], deviation - x[-1], 0)
    below = np.where(deviation < x[0], deviation - x[0], 0)
    return np.interp(deviation, x, y) + beyond + below


def calibrated(estimate: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    static = estimate.mean(axis=0, keepdims=True)
    return static + apply_map(estimate - static, x, y)


def main() -> None:
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    for tag in sys.argv[2:]:
        truth_path = root / f"truth-{tag}.zarr"
        truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
        noisy = np.asarray(open_image(root / f"noisy-{tag}.zarr").data, dtype=np.float32)
        masks = np.asarray(read_masks(truth_path))
        predictor = ModelPredictor(root / f"model-{tag}.safetensors", device="cpu", batch_size=4)
        plain = predict_array(noisy, predictor, patch=PATCH, overlap=0.25)
        held_out = masked_estimate(noisy, predictor)
        static = held_out.mean(axis=0, keepdims=True)
        x, y = fit_map(held_out - static, noisy - static)
        variants = {
            "plain": plain,
            "masked": held_out,
            "masked, calibrated": calibrated(held_out, x, y),
            "plain, calibrated": calibrated(plain, x, y),
        }
        keep = ("snr_db", "trace_r", "trace_gain", "pixel_r", "pixel_gain")
        for name, estimate in variants.items():
            scores = evaluate(estimate, truth, masks=masks, offset=OFFSET)
            line = {"model": tag, "method": name, **{k: round(scores[k], 4) for k in keep}}
            line.update(trace_diagnostics(estimate, truth, masks))
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
