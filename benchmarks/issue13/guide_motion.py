"""What ``--guide`` costs on a recording that moves (issue 13).

``--guide`` filters each frame's activity with the recording's mean image, which shows where the
cells are only if they stay put. This script takes one acceptance model and its movie (what
``benchmarks/quality.py --workdir --keep`` leaves), shifts every frame of the noisy movie and
of the truth by a random whole-pixel offset in ``[-J, J]`` on y and x (wrapping around, the
same offsets for both), predicts the moved movie with srdvol's default (``--anchor 4``) and with
``--guide 2`` on top, and scores SNR and SSIM against the moved truth (cell masks do not move
with the frames, so no trace scores). One JSON line per jitter and method::

    python benchmarks/issue13/guide_motion.py /tmp/srdvol-anchor --model 4-0 --jitter 0 1 2 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from srdvol.core.metrics import evaluate
from srdvol.ngff.read import open_image
from srdvol.options import DEFAULT_ANCHOR
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor

OFFSET = 100.0  # the simulator's detector offset, removed before SNR


def shifted(movie: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Every frame rolled by its (y, x) offset."""
    frames = zip(movie, offsets, strict=True)
    return np.stack([np.roll(f, tuple(o), axis=(0, 1)) for f, o in frames])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--model", default="4-0", help="tag of model-TAG.safetensors")
    parser.add_argument("--jitter", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--guide", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tag = args.model
    model = args.workdir / f"model-{tag}.safetensors"
    truth = np.asarray(open_image(args.workdir / f"truth-{tag}.zarr").data, dtype=np.float32)
    noisy = np.asarray(open_image(args.workdir / f"noisy-{tag}.zarr").data, dtype=np.float32)
    rng = np.random.default_rng(0)
    methods = {
        "srdvol": ModelPredictor(model, device="cpu", batch_size=4, anchor=DEFAULT_ANCHOR),
        f"srdvol --guide {args.guide}": ModelPredictor(
            model, device="cpu", batch_size=4, anchor=DEFAULT_ANCHOR, guide=args.guide
        ),
    }
    for jitter in args.jitter:
        offsets = rng.integers(-jitter, jitter + 1, size=(len(noisy), 2))
        moved_truth, moved_noisy = shifted(truth, offsets), shifted(noisy, offsets)
        for name, predictor in methods.items():
            started = time.process_time()
            estimate = predict_array(moved_noisy, predictor, patch=(32, 64, 64), overlap=0.25)
            scores = evaluate(estimate, moved_truth, offset=OFFSET)
            line = {"model": tag, "jitter_px": jitter, "method": name}
            line |= {k: round(float(scores[k]), 4) for k in ("snr_db", "ssim")}
            line["predict_cpu_s"] = round(time.process_time() - started, 1)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
