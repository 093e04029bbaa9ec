"""What post-processing can still buy on the acceptance models (issue 13): the ``--guide``
filter's own amplitude cost, and the trade between transient gain and pixel r.

``--guide 2`` (then ``--anchor 4``) meets every target in five of the six acceptance runs; in
photons 2 seed 1 the median transient gain is 0.941. This script asks whether any variant of
the post-processing closes that without opening another target. For every model tag it
predicts the network's own output once (as ``inference.py``'s ``plain``; kept in
``WORKDIR/plain-TAG.npy`` for reruns) and scores, as whole frames in units of the input's std:

- ``truth R eps E``: the truth itself through the guide of radius R with slope regularisation
  E (``M`` still the noisy movie's mean image): the filter's structural amplitude cost, with
  no network and no noise;
- ``guide eps E``: ``--guide 2`` then ``--anchor 4`` with the slope regularised by E (the
  windows' weights keep :data:`~srdvol.predict.guide.GUIDE_EPS`);
- ``guided residual R weight W``: ``--guide 2``, then ``W`` times the guided filter (radius R,
  guide ``M``) of the residual ``noisy - guided`` added back, then ``--anchor 4``: a
  correction of the network's cell-scale bias shaped like the mean image instead of a
  Gaussian (``W`` 1 without the Gaussian anchor is the row ``... alone``);
- ``guide 2 anchor S``: ``--guide 2`` then the plain Gaussian anchor of S, for every S of
  ``--anchors`` (``--guide 2 --anchor S`` until the anchor was shaped);
- ``guide 2 shaped anchor S``: ``--guide 2 --anchor S`` as srdvol runs it now, the anchor's
  correction shaped like the mean image (:func:`~srdvol.predict.anchor.shape_of`).

``--families`` picks which of these run (default: all). With ``--tta`` the network's output
is ``--tta``'s (the 8 turns and mirrors of every patch averaged; kept in
``WORKDIR/tta-TAG.npy``) and every row's name starts with ``tta``.

One JSON line per model and variant on stdout, readable by ``acceptance.py``. Run from the
repository root, one thread::

    python benchmarks/issue13/guide_frontier.py /tmp/srdvol-anchor --models 4-0 2-1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import OFFSET, anchored, guided_frames

from srdvol.core.metrics import evaluate
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.options import DEFAULT_ANCHOR
from srdvol.predict.block import predict_array
from srdvol.predict.guide import GUIDE_EPS, guided_filter, mean_image
from srdvol.predict.predictors import ModelPredictor

SCORES = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")


class Frames:
    """The guide's filter on whole movies, in units of the noisy movie's std."""

    def __init__(self, noisy: np.ndarray) -> None:
        self.noisy, self.std = noisy, float(noisy.std())
        self.image = mean_image(noisy)
        self.guide = torch.from_numpy(self.image / self.std)[None]

    def filter(self, movie: np.ndarray, radius: int, slope_eps: float = GUIDE_EPS) -> np.ndarray:
        """``M + GF(movie - M; guide M)``, the slope regularised by ``slope_eps``."""
        return guided_frames(movie, self.noisy, radius, slope_eps)

    def residual(self, movie: np.ndarray, radius: int, weight: float) -> np.ndarray:
        """``movie`` plus ``weight`` times the guided filter of ``noisy - movie``."""
        residual = torch.from_numpy((self.noisy - movie) / self.std)[None]
        correction = guided_filter(residual, self.guide, radius)[0].numpy()
        return movie + weight * self.std * correction


def variants(frames: Frames, plain: np.ndarray, truth: np.ndarray, args: Any) -> Any:
    """``(name, estimate)`` for every variant of the module docstring."""
    families = set(args.families)
    if "truth" in families:
        yield from _truth_rows(frames, truth, args)
    if "eps" in families:
        for eps in args.eps:
            yield f"guide eps {eps:g}", anchored(frames.filter(plain, 2, eps), frames.noisy, 4)
    first = frames.filter(plain, 2)
    if "anchors" in families:
        for sigma in args.anchors:
            yield f"guide 2 anchor {sigma:g}", anchored(first, frames.noisy, sigma)
    if "shaped" in families:
        for sigma in args.anchors:
            yield f"guide 2 shaped anchor {sigma:g}", anchored(first, frames.noisy, sigma, True)
    for radius in args.radii if "residual" in families else ():
        yield f"guided residual {radius} alone", frames.residual(first, radius, 1.0)
        for weight in args.weights:
            corrected = frames.residual(first, radius, weight)
            yield (
                f"guided residual {radius} weight {weight:g}",
                anchored(corrected, frames.noisy, DEFAULT_ANCHOR),
            )


def _truth_rows(frames: Frames, truth: np.ndarray, args: Any) -> Any:
    for radius in (1, 2, 3):
        for eps in args.eps:
            yield f"truth {radius} eps {eps:g}", frames.filter(truth, radius, eps)


FAMILIES = ("truth", "eps", "residual", "anchors", "shaped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--models", nargs="+", required=True, help="tags, e.g. 4-0 2-1")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--radii", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--anchors", type=float, nargs="+", default=[3, 3.5, 4])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--tta", action="store_true", help="the network's output with --tta")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for tag in args.models:
        truth_path = args.workdir / f"truth-{tag}.zarr"
        truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
        noisy = np.asarray(open_image(args.workdir / f"noisy-{tag}.zarr").data, dtype=np.float32)
        masks = np.asarray(read_masks(truth_path))
        cached = args.workdir / f"{'tta' if args.tta else 'plain'}-{tag}.npy"
        if not cached.exists():
            model = ModelPredictor(
                args.workdir / f"model-{tag}.safetensors", device="cpu", batch_size=4, tta=args.tta
            )
            np.save(cached, predict_array(noisy, model, patch=(32, 64, 64), overlap=0.25))
        plain = np.load(cached)
        for name, estimate in variants(Frames(noisy), plain, truth, args):
            scores = evaluate(estimate, truth, masks=masks, offset=OFFSET)
            name = f"tta {name}" if args.tta else name
            line = {"model": tag, "method": name, **{k: scores[k] for k in SCORES}}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
