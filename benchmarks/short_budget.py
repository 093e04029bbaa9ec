"""Short-budget training experiments on simulated 0.3 Hz calcium imaging (issue 13).

One run = simulate (or reuse) a recording with its ground truth, train srdvol's default network
through srdvol's own training path (``prepare_training`` + ``run_training``) with one variant
of the method, predict the whole movie, save the denoised movie as ``.npy`` and score it with
:func:`srdvol.core.metrics.evaluate` (SNR, SSIM, per-cell trace r and gain, pixel trace r and
gain inside somata). Every run appends one JSON line to ``--log``: the settings, the scores,
the **process CPU seconds** of training (``time.process_time``: the budget of the issue, which
does not depend on other jobs on a shared machine), its wall seconds and the load average
before and after.

Variants (each changes one thing; the rest is srdvol's default path):

- ``--loss l1mse|mse|l1``: the self-supervised loss (srdvol's default is upstream's
  ``0.5 L1 + 0.5 MSE``);
- ``--schedule cosine|constant``: srdvol's warm-up + cosine decay, or a constant lr after the
  warm-up;
- ``--transform none|anscombe``: train and predict on the generalised Anscombe transform of the
  data (noise made homoscedastic), then invert it (exact unbiased inverse is not used: the
  algebraic one, so a bias shows);
- ``--no-augment``: no dihedral augmentation;
- ``--shuffle-frames``: the frames of every training patch in a random order of their own
  (at 0.3 Hz consecutive frames share no activity, so their order carries nothing but an
  invitation to mix neighbours' transients);
- ``--tta``: predict every patch in the 8 symmetries of the square and average (``srdvol
  predict --tta``; 8x the inference cost);
- ``--overlap``, ``--window``: inference lattice (``--from-model TAG`` predicts with the model
  of an earlier run instead of training);
- ``--patch``, ``--batch-size``, ``--steps``, ``--lr``.

``--rescore`` re-scores every saved movie of the log with the current metrics instead of
training (the metrics may change after a run).

Run from the repository root, one torch thread pinned to one core::

    taskset -c 1 python benchmarks/short_budget.py --photons 4 --seed 0 --steps 300 \\
        --patch 16,64,64 --batch-size 4 --tag base
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srdvol.core.metrics import evaluate
from srdvol.model.config import NetworkConfig
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.options import DEFAULT_LR, DEFAULT_OVERLAP, TrainOptions
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor
from srdvol.simulate import simulate
from srdvol.training.loop import run_training
from srdvol.training.plan import prepare_training
from srdvol.training.trainer import WARMUP_FRACTION, Trainer

WORKDIR = Path(os.environ.get("SRDVOL_BENCH_DIR", "/tmp/srdvol-short-budget"))


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------ data


def movie_paths(photons: float, seed: int, frames: int, size: int) -> tuple[Path, Path]:
    name = f"p{photons:g}-s{seed}-t{frames}-{size}"
    return WORKDIR / f"noisy-{name}.zarr", WORKDIR / f"truth-{name}.zarr"


def ensure_movie(photons: float, seed: int, frames: int, size: int) -> dict[str, Any]:
    """Simulate once per (photons, seed, frames, size); later runs reuse the stores."""
    noisy, truth = movie_paths(photons, seed, frames, size)
    if not (truth / "labels").exists():
        simulate(
            noisy,
            truth=truth,
            frames=frames,
            size=(size, size),
            rate_hz=0.3,
            photons=photons,
            seed=seed,
            overwrite=True,
        )
    from srdvol.ngff.provenance import simulation_record

    return {
        "noisy_path": noisy,
        "truth_path": truth,
        "noisy": np.asarray(open_image(noisy).data, dtype=np.float32),
        "truth": np.asarray(open_image(truth).data, dtype=np.float32),
        "masks": read_masks(truth),
        "offset": float((simulation_record(truth) or {}).get("offset", 0.0)),
    }


def anscombe(x: np.ndarray, *, gain: float, offset: float, read_noise: float) -> np.ndarray:
    """Generalised Anscombe transform of counts ``offset + gain * Poisson + N(0, read_noise)``."""
    value = gain * (x - offset) + 0.375 * gain**2 + read_noise**2
    return (2.0 / gain) * np.sqrt(np.maximum(value, 0.0))


def anscombe_inverse(y: np.ndarray, *, gain: float, offset: float, read_noise: float) -> np.ndarray:
    """The algebraic inverse of :func:`anscombe`."""
    return ((gain * y / 2.0) ** 2 - 0.375 * gain**2 - read_noise**2) / gain + offset


# ------------------------------------------------------------------------------ variants


def make_trainer_class(
    loss: str, schedule: str, augment: bool, shuffle: bool = False
) -> type[Trainer]:
    """srdvol's Trainer with one thing changed; records every loss."""

    class Variant(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.losses: list[float] = []
            if schedule == "constant":
                warm = max(1, round(WARMUP_FRACTION * self.steps))
                self.schedule = torch.optim.lr_scheduler.LambdaLR(
                    self.optimizer, lambda s: (s + 1) / warm if s < warm else 1.0
                )

        def pairs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if shuffle:  # every patch's frames in a random order of their own
                order = torch.argsort(
                    torch.rand(batch.shape[:2], generator=self.generator, device=batch.device),
                    dim=1,
                )
                batch = torch.take_along_dim(batch, order[:, :, None, None], dim=1)
            if augment:
                return super().pairs(batch)
            from srdvol.training.pairs import spatial_pairs

            return spatial_pairs(batch, generator=self.generator)

        def loss(self, batch: np.ndarray) -> torch.Tensor:
            if loss in ("mse", "l1mse"):  # srdvol's own losses, named explicitly
                self.loss_kind = loss
                return super().loss(batch)
            import torch.nn.functional as F

            from srdvol.core.normalize import normalize

            x = torch.from_numpy(normalize(batch, self.stats)).to(self.device)
            inputs, *targets = self.pairs(x)
            prediction = self.model(inputs[:, None])[:, 0]
            return sum(F.l1_loss(prediction, t) for t in targets) / len(targets)

        def step(self, batch: np.ndarray) -> float:
            value = super().step(batch)
            self.losses.append(value)
            return value

    return Variant


# ------------------------------------------------------------------------------ one run


def run(args: argparse.Namespace) -> dict[str, Any]:
    movie = ensure_movie(args.photons, args.seed, args.frames, args.size)
    patch = tuple(int(v) for v in args.patch.split(","))
    tag = args.tag
    source = movie["noisy_path"]
    sim = {"gain": 10.0, "offset": movie["offset"], "read_noise": 5.0}
    if args.transform == "anscombe":
        import xarray as xr

        source = open_image(movie["noisy_path"])
        import dask.array as da

        source = xr.DataArray(
            da.from_array(anscombe(movie["noisy"], **sim).astype(np.float32), chunks=(16, -1, -1)),
            dims=source.dims,
            attrs=dict(source.attrs),
        )
    model = WORKDIR / f"model-{args.from_model or tag}.safetensors"
    options = TrainOptions(
        patch=patch,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        network=NetworkConfig(patch_t=patch[0]),
        overwrite=True,
        checkpoint_every=max(args.steps, 1),
    )
    trainers: list[Trainer] = []
    before = load()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if not args.from_model:
        plan = prepare_training(source, model, options)
        run_training(
            plan,
            device="cpu",
            make_trainer=functools.partial(
                make_trainer_class(
                    args.loss, args.schedule, not args.no_augment, args.shuffle_frames
                )
            ),
            on_finish=trainers.append,
        )
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    after_train = load()
    predictor = ModelPredictor(model, device="cpu", batch_size=4, tta=args.tta)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    noisy_in = movie["noisy"] if args.transform == "none" else anscombe(movie["noisy"], **sim)
    denoised = predict_array(
        noisy_in.astype(np.float32),
        predictor,
        patch=patch,
        overlap=args.overlap,
        window_kind=args.window,
    )
    if args.transform == "anscombe":
        denoised = anscombe_inverse(denoised.astype(np.float64), **sim).astype(np.float32)
    predict_cpu, predict_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    saved = WORKDIR / f"denoised-{tag}.npy"
    np.save(saved, denoised)
    losses = getattr(trainers[0], "losses", []) if trainers else []
    row = {
        "tag": tag,
        "settings": {k: v for k, v in vars(args).items() if k not in ("log", "rescore")},
        "train_cpu_s": round(train_cpu, 1),
        "train_wall_s": round(train_wall, 1),
        "predict_cpu_s": round(predict_cpu, 1),
        "predict_wall_s": round(predict_wall, 1),
        "load_before": before,
        "load_after_train": after_train,
        "load_after": load(),
        "final_loss": float(np.mean(losses[-20:])) if losses else math.nan,
        "max_loss_after_warmup": float(max(losses[len(losses) // 10 :])) if losses else math.nan,
        "denoised": str(saved),
        "scores": score(movie, denoised),
        "torch_threads": torch.get_num_threads(),
    }
    return row


def score(movie: dict[str, Any], estimate: np.ndarray) -> dict[str, float]:
    return evaluate(estimate, movie["truth"], masks=movie["masks"], offset=movie["offset"])


def rescore(log: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for row in rows:
        s = row["settings"]
        movie = ensure_movie(s["photons"], s["seed"], s["frames"], s["size"])
        row["scores"] = score(movie, np.load(row["denoised"]))
        print(row["tag"], json.dumps(row["scores"]))
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", default="16,64,64")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--loss", choices=("l1mse", "mse", "l1"), default="l1mse")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--transform", choices=("none", "anscombe"), default="none")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--shuffle-frames", action="store_true")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP)
    parser.add_argument("--window", choices=("tent", "cos2"), default="tent")
    parser.add_argument("--tta", action="store_true", help="average over the 8 symmetries")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default=None)
    parser.add_argument(
        "--from-model", default=None, help="predict with the model of this earlier run's tag"
    )
    parser.add_argument("--log", type=Path, default=Path("benchmarks/short_budget.jsonl"))
    parser.add_argument("--rescore", action="store_true")
    args = parser.parse_args()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.rescore:
        rescore(args.log)
        return
    if args.tag is None:
        args.tag = f"p{args.photons:g}-s{args.seed}-{args.patch}-b{args.batch_size}-{args.steps}"
    row = run(args)
    with args.log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
