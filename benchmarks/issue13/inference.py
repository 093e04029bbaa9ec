"""Inference choices on trained models of the acceptance runs (issue 13): plain, ``--tta``, the
training scale, and where the cell-trace error comes from.

For every ``model-P-S.safetensors`` in ``WORKDIR`` (what ``benchmarks/quality.py --workdir``
leaves: the model, its noisy movie and truth), the script predicts the whole movie as
``srdvol predict`` does (overlap 0.25):

- ``plain``: the model at full resolution, the network's own output (``--anchor 0``);
- ``tta``: :class:`~srdvol.predict.predictors.ModelPredictor` with ``tta=True`` (``--tta
  --anchor 0``);
- ``anchor`` and ``tta+anchor``: the same with ``anchor=--anchor`` (default: srdvol's,
  :data:`srdvol.options.DEFAULT_ANCHOR`);
- ``anchor-sweep``: the ``plain`` prediction anchored as a whole movie (one frame at a time)
  at every sigma of ``--sweep`` (the per-patch anchoring of ``srdvol predict`` differs from it
  by under 0.01 dB, RESULTS.md), rows ``anchor-frame SIGMA``;
- ``guide``: ``--guide`` (default 2) with the anchoring of ``--anchor``, as ``srdvol predict
  --guide 2`` runs it;
- ``guided-input``: a reference without the network, the same guided filter applied to the
  noisy input itself (``M + GF_R(noisy - M; guide M)``, ``M`` its mean image), one row per
  radius of ``--guide-sweep``;
- ``guide-sweep``: the choices behind ``--guide``, on the ``plain`` prediction as whole frames
  (in units of the input's std, where the predictor uses the model's): rows ``guide-frame R
  anchor S`` (the guide of radius R, then anchoring at S) for every R of ``--guide-sweep`` at
  ``--anchor``, and for ``--guide`` at every S of ``--sweep``; and ``anchor-then-guide R``
  (the other order);
- ``subgrid``: the four half-resolution sub-grids ``noisy[:, i::2, j::2]`` denoised on their
  own and interleaved (the scale the network is trained at).

and scores each with :func:`srdvol.core.metrics.evaluate`, plus two diagnostics of the cell
traces (truth's cell masks):

- **leak**: median over cells of ``b`` in ``estimate[t] = a truth[t] + b (truth[t-1] +
  truth[t+1]) / 2 + c`` (activity of the neighbouring frames mixed in);
- **curvature**: median over cells of the share of the estimate's variance left unexplained by
  a straight line of the truth that a quadratic explains (0: the estimate is linear in the
  truth, as the noisy input is), and the **amplitude curve**: per class of frames by the
  truth's height above the cell's baseline (percentiles 50-80, 80-90, 90-95, 95-98, 98-100 of
  each cell's trace; baseline = the mean of its lower half), the estimate's rise over its own
  baseline divided by the truth's, summed over cells (1 = amplitudes kept; the noisy input,
  unbiased, is about 1 in every class).

One JSON line per model and method on stdout. Run from the repository root, one thread::

    python benchmarks/issue13/inference.py /tmp/srdvol-short-budget/tmp_XXXX \\
        --methods plain tta subgrid anchor tta+anchor anchor-sweep [--models 4-0 4-1] \\
        [--anchor 4] [--sweep 2 3 4 6]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import subgrid_prediction

from srdvol.core.metrics import cell_traces, evaluate
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.options import DEFAULT_ANCHOR
from srdvol.predict.anchor import anchor_to_input
from srdvol.predict.block import predict_array
from srdvol.predict.guide import GUIDE_EPS, guided_filter, mean_image
from srdvol.predict.predictors import ModelPredictor

#: The simulator's detector offset (srdvol.simulate's default), removed before SNR.
OFFSET = 100.0
PERCENTILES = (0, 50, 80, 90, 95, 98, 100)


def trace_diagnostics(estimate: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> dict:
    """Leak, curvature and the amplitude curve of the cell traces (module docstring)."""
    cells = np.nonzero(np.bincount(masks.ravel())[1:])[0] + 1
    e, g = cell_traces(estimate, masks)[:, cells], cell_traces(truth, masks)[:, cells]
    leaks, curvature = [], []
    for j in range(len(cells)):
        y, x = e[1:-1, j], g[1:-1, j]
        neighbours = 0.5 * (g[:-2, j] + g[2:, j])
        leaks.append(_fit(y, [x, neighbours])[1][1])
        linear, quadratic = _fit(y, [x])[0], _fit(y, [x, x**2])[0]
        curvature.append((quadratic - linear) / max(1 - linear, 1e-12))
    # Each frame's height above the cell's baseline (the mean of the frames in the truth's
    # lower half), per class of the truth's height: the noisy input, unbiased, scores 1 in each.
    cuts = np.percentile(g, PERCENTILES, axis=0)
    low = g <= cuts[1]
    base_e = (e * low).sum(axis=0) / low.sum(axis=0)
    base_g = (g * low).sum(axis=0) / low.sum(axis=0)
    curve = []
    for lo, hi in itertools.pairwise(cuts[1:]):
        inside = (g > lo) & (g <= hi)
        rise_e = ((e - base_e) * inside).sum()
        rise_g = ((g - base_g) * inside).sum()
        curve.append(float(rise_e / rise_g))
    return {
        "leak": float(np.median(leaks)),
        "curvature": float(np.median(curvature)),
        "amplitude_curve": [round(v, 3) for v in curve],
    }


def _fit(y: np.ndarray, columns: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """R² and coefficients of the least-squares fit of ``y`` on ``columns`` and a constant."""
    x = np.stack([*columns, np.ones(len(y))], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return 1 - float((y - x @ coef).var() / y.var()), coef


def guided_frames(
    estimate: np.ndarray, noisy: np.ndarray, radius: int, eps: float = GUIDE_EPS
) -> np.ndarray:
    """``M + GF(estimate - M; guide M)`` over whole frames, ``M`` the noisy movie's mean image,
    in units of its std (the filter of ``--guide``; ``eps``: its slope's regularisation, the
    windows' weights keep :data:`~srdvol.predict.guide.GUIDE_EPS`)."""
    std = float(noisy.std())
    image = mean_image(noisy)
    activity = torch.from_numpy((estimate - image) / std)[None]
    guide = torch.from_numpy(image / std)[None]
    filtered = guided_filter(activity, guide, radius, eps, weight_eps=GUIDE_EPS)
    return image + std * filtered[0].numpy()


def anchored(
    estimate: np.ndarray, noisy: np.ndarray, sigma: float, shaped: bool = False
) -> np.ndarray:
    """``estimate`` anchored to ``noisy`` as whole frames (:func:`anchor_to_input`); ``shaped``:
    the correction shaped like ``noisy``'s mean image, as ``--guide`` runs it."""
    image = torch.from_numpy(mean_image(noisy))[None] if shaped else None
    out = anchor_to_input(
        torch.from_numpy(noisy)[None], torch.from_numpy(estimate)[None], sigma, image
    )
    return out[0].numpy()


def plain_row(rows: list, predict: Any) -> np.ndarray:
    """The ``plain`` row's estimate (the network's own), predicted once and kept in ``rows``."""
    if not any(r[0] == "plain" for r in rows):
        rows.append(("plain", predict(), 0.0))
    return next(r[1] for r in rows if r[0] == "plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=(
            "plain",
            "tta",
            "subgrid",
            "anchor",
            "tta+anchor",
            "anchor-sweep",
            "guide",
            "guided-input",
            "guide-sweep",
        ),
        default=["plain", "tta"],
    )
    parser.add_argument("--anchor", type=float, default=DEFAULT_ANCHOR)
    parser.add_argument("--sweep", type=float, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--guide", type=int, default=2)
    parser.add_argument("--guide-sweep", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=None, help="tags, e.g. 4-0 2-1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = (32, 64, 64)
    for model in sorted(args.workdir.glob("model-*.safetensors")):
        tag = re.fullmatch(r"model-(.+)\.safetensors", model.name).group(1)
        if args.models and tag not in args.models:
            continue
        truth_path = args.workdir / f"truth-{tag}.zarr"
        truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
        noisy = np.asarray(open_image(args.workdir / f"noisy-{tag}.zarr").data, dtype=np.float32)
        masks = np.asarray(read_masks(truth_path))
        plain = ModelPredictor(model, device="cpu", batch_size=4)
        predictors = {
            "plain": plain,
            "tta": ModelPredictor(model, device="cpu", batch_size=4, tta=True),
            "anchor": ModelPredictor(model, device="cpu", batch_size=4, anchor=args.anchor),
            "tta+anchor": ModelPredictor(
                model, device="cpu", batch_size=4, tta=True, anchor=args.anchor
            ),
            "guide": ModelPredictor(
                model, device="cpu", batch_size=4, anchor=args.anchor, guide=args.guide
            ),
        }
        methods = {
            name: functools.partial(predict_array, noisy, p, patch=patch, overlap=0.25)
            for name, p in predictors.items()
        }
        methods |= {
            "subgrid": functools.partial(subgrid_prediction, noisy, plain, patch, 0.25),
        }
        rows = [("noisy", noisy, 0.0)]
        own = functools.partial(plain_row, rows, methods["plain"])
        for name in args.methods:
            if name == "anchor-sweep":
                for sigma in args.sweep:
                    rows.append((f"anchor-frame {sigma:g}", anchored(own(), noisy, sigma), 0.0))
                continue
            if name == "guided-input":
                for radius in args.guide_sweep:
                    reference = guided_frames(noisy, noisy, radius)
                    rows.append((f"guided-input {radius}", reference, 0.0))
                continue
            if name == "guide-sweep":
                for radius in args.guide_sweep:
                    guided = anchored(guided_frames(own(), noisy, radius), noisy, args.anchor)
                    rows.append((f"guide-frame {radius} anchor {args.anchor:g}", guided, 0.0))
                for sigma in args.sweep:
                    guided = anchored(guided_frames(own(), noisy, args.guide), noisy, sigma)
                    rows.append((f"guide-frame {args.guide} anchor {sigma:g}", guided, 0.0))
                first = guided_frames(anchored(own(), noisy, args.anchor), noisy, args.guide)
                rows.append((f"anchor-then-guide {args.guide}", first, 0.0))
                continue
            started = time.process_time()
            rows.append((name, methods[name](), time.process_time() - started))
        for name, estimate, cpu in rows:
            scores = evaluate(estimate, truth, masks=masks, offset=OFFSET)
            keep = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")
            line = {"model": tag, "method": name, **{k: scores[k] for k in keep}}
            line.update(trace_diagnostics(estimate, truth, masks), predict_cpu_s=round(cpu, 1))
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
