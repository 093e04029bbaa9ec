"""Weight averaging at a short budget (issue 13): one training run, its final weights against
exponential moving averages of its weights, on the same movie (a paired comparison: the same
patches, pairs and steps; only the weights that predict differ).

Trains srdvol's default path (``prepare_training`` + ``run_training``, MSE, (32, 64, 64) x 2)
on a movie that ``benchmarks/quality.py --workdir`` left (``noisy-P-S.zarr`` with its truth),
keeping after every optimiser step ``ema = d * ema + (1 - d) * weights`` for each ``--decay``
(buffers copied), then predicts the movie with the final model and with each average (overlap
0.25) and prints one JSON line per set of weights: scores of
:func:`srdvol.core.metrics.evaluate` and the cell-trace diagnostics of ``inference.py``.

Run from the repository root, one thread on one core::

    taskset -c 1 python benchmarks/issue13/ema.py /tmp/srdvol-short-budget/tmp_XXXX 4-1 \\
        --steps 850 --decay 0.99 0.995
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import OFFSET, trace_diagnostics

from srdvol.core.metrics import evaluate
from srdvol.model.checkpoint import load_model, save_model
from srdvol.model.config import NetworkConfig
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.options import TrainOptions
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor
from srdvol.training.loop import run_training
from srdvol.training.plan import prepare_training
from srdvol.training.trainer import Trainer


class AveragingTrainer(Trainer):
    """srdvol's Trainer, keeping moving averages of the network's weights."""

    def __init__(self, *args: Any, decays: tuple[float, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decays = decays
        self.averages = [self._copy() for _ in decays]

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def step(self, batch: np.ndarray) -> float:
        loss = super().step(batch)
        with torch.no_grad():
            current = self.network.state_dict()
            for decay, average in zip(self.decays, self.averages, strict=True):
                for name, value in current.items():
                    if value.is_floating_point():
                        average[name].mul_(decay).add_(value, alpha=1 - decay)
                    else:
                        average[name].copy_(value)
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("movie", help="P-S, e.g. 4-1 (photons 4, seed 1)")
    parser.add_argument("--steps", type=int, default=850)
    parser.add_argument("--decay", type=float, nargs="+", default=[0.99, 0.995])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed = int(args.movie.split("-")[1])
    noisy_path = args.workdir / f"noisy-{args.movie}.zarr"
    truth_path = args.workdir / f"truth-{args.movie}.zarr"
    model = args.workdir / f"ema-model-{args.movie}.safetensors"
    patch = (32, 64, 64)
    options = TrainOptions(
        patch=patch,
        steps=args.steps,
        batch_size=2,
        seed=seed,
        network=NetworkConfig(patch_t=patch[0]),
        overwrite=True,
        checkpoint_every=args.steps,
    )
    trainers: list[AveragingTrainer] = []
    cpu = time.process_time()
    run_training(
        prepare_training(noisy_path, model, options),
        device="cpu",
        make_trainer=functools.partial(AveragingTrainer, decays=tuple(args.decay)),
        on_finish=trainers.append,
    )
    train_cpu = time.process_time() - cpu
    network, record = load_model(model)
    models = {"final": model}
    for decay, average in zip(args.decay, trainers[0].averages, strict=True):
        network.load_state_dict(average)
        models[f"ema {decay:g}"] = model.with_name(f"ema-{decay:g}-{args.movie}.safetensors")
        save_model(models[f"ema {decay:g}"], network, record)
    noisy = np.asarray(open_image(noisy_path).data, dtype=np.float32)
    truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
    masks = np.asarray(read_masks(truth_path))
    for name, path in models.items():
        predictor = ModelPredictor(path, device="cpu", batch_size=4)
        estimate = predict_array(noisy, predictor, patch=patch, overlap=0.25)
        scores = evaluate(estimate, truth, masks=masks, offset=OFFSET)
        keep = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")
        line = {"movie": args.movie, "weights": name, "steps": args.steps}
        line.update({k: scores[k] for k in keep}, **trace_diagnostics(estimate, truth, masks))
        line["train_cpu_s"] = round(train_cpu, 1)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
