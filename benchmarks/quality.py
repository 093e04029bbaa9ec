"""Denoising quality on simulated 0.3 Hz calcium imaging: srdvol against classical filters.

For each photon budget and each seed the script simulates a noisy movie with its ground truth
(:func:`srdvol.simulate.simulate`; the seed also seeds training unless ``--train-seed`` says),
then scores, with :func:`srdvol.core.metrics.evaluate` (per-frame SNR in dB against the truth,
detector offset removed; SSIM; per-cell trace correlation and median transient gain; the same
per pixel inside the cells, see :mod:`srdvol.core.traces`):

- the noisy input;
- a **3D Gaussian filter** (scipy ``gaussian_filter`` over t, y, x) and a **median filter**
  (t x yx x yx window), each *oracle-tuned*: every point of a grid of sigmas (sizes) is scored
  against the truth, and the best one is picked **separately for SNR, for SSIM and for trace
  correlation** (three rows each). A pick at either end of a grid axis widens that axis and
  searches again (the picks are made for SNR, SSIM, cell trace r and pixel trace r; a gain is
  not a score to maximise), so no pick sits at an edge of the searched grid unless it is a natural
  end of
  the axis: ``sigma_t = 0`` or a median 1 frame long (the per-frame filter), ``sigma_t`` = the
  movie's length or a median of ``2 * frames - 1`` (the time average), ``sigma_yx = 0`` or a
  median 1 px wide (no spatial filter);
- **srdvol**: training as :func:`srdvol.train` does it (spatial sampling, no truth), then a
  whole-movie prediction with :func:`srdvol.predict.block.predict_array` at ``--overlap``
  (default: the command line's default, 0.25) and ``--anchor`` (default: the command line's,
  :data:`srdvol.options.DEFAULT_ANCHOR`); with an anchor, the network's own output
  (``--anchor 0``) is scored too, as "srdvol, --anchor 0";
- with ``--subgrid``, the same model applied to the four half-resolution sub-grids
  ``noisy[:, i::2, j::2]`` (the resolution the network is trained at) and put back together,
  against full-resolution inference (what the method prescribes).

``--budget reference`` trains exactly the reference SRDTrans runs' budget: 675 steps of
(64, 64, 64) patches, batch 1 (what upstream trains on one GPU); ``--budget reference-batch``
the same steps and patches at srdvol's default batch. ``--baselines gaussian`` leaves out the
median filter (slow on long movies: its time axis widens to the whole movie); ``gaussian2d``
adds the frame-by-frame Gaussian (sigma_t = 0), tuned the same way.

It prints the chosen parameters of every baseline per seed, one row per seed and method, and a
summary over the seeds (mean, sample standard deviation, min-max). ``--json FILE`` keeps every
figure. Training is timed in **process CPU seconds** (``time.process_time``, what a shared
machine does not inflate) and in wall seconds, with the load average before and after (the
scores do not depend on the load).

Run from the repository root (results: benchmarks/RESULTS.md)::

    python benchmarks/quality.py --network default --photons 2 --seeds 0 1 2 --threads 1 --subgrid
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage

from srdvol.core.metrics import evaluate
from srdvol.model.config import NetworkConfig
from srdvol.model.device import resolve_device
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.options import DEFAULT_ANCHOR, DEFAULT_OVERLAP, TrainOptions
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor
from srdvol.simulate import simulate
from srdvol.training.loop import run_training
from srdvol.training.plan import prepare_training
from srdvol.training.trainer import GRAD_CLIP, Trainer
from srdvol.values import default_anchor

#: Scores a baseline is tuned for (higher is better); every row also shows the gains.
METRICS = ("snr_db", "ssim", "trace_r", "pixel_r")
COLUMNS = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")
LABELS = {
    "snr_db": "SNR",
    "ssim": "SSIM",
    "trace_r": "trace r",
    "trace_gain": "trace gain",
    "pixel_r": "pixel r",
    "pixel_gain": "pixel gain",
}
DIGITS = {"snr_db": 2, "ssim": 3, "trace_r": 4, "trace_gain": 2, "pixel_r": 3, "pixel_gain": 2}
#: Fixed training budgets: the reference SRDTrans runs (675 steps of 64^3 patches, batch 1) and
#: the same at srdvol's default batch.
BUDGETS = {
    "reference": {"steps": 675, "patch_t": 64, "patch_yx": 64, "batch_size": 1},
    "reference-batch": {"steps": 675, "patch_t": 64, "patch_yx": 64, "batch_size": None},
}
NETWORKS = {
    # ~40 k parameters: trains in CPU minutes.
    "small": lambda t: NetworkConfig(channels=(4, 8, 8, 16), embed_dim=32, heads=4, patch_t=t),
    # The paper-sized network (~1.8 M parameters).
    "default": lambda t: NetworkConfig(patch_t=t),
}


# ------------------------------------------------------------------------------ data


@dataclass
class Movie:
    """A simulated recording in memory, with what scoring needs."""

    path: Path
    noisy: np.ndarray
    truth: np.ndarray
    masks: Any
    offset: float

    def score(self, estimate: np.ndarray) -> dict[str, float]:
        return evaluate(estimate, self.truth, masks=self.masks, offset=self.offset)


def make_movie(root: Path, *, photons: float, seed: int, frames: int, size: int) -> Movie:
    noisy_path = root / f"noisy-{photons:g}-{seed}.zarr"
    truth_path = root / f"truth-{photons:g}-{seed}.zarr"
    info = simulate(
        noisy_path,
        truth=truth_path,
        frames=frames,
        size=(size, size),
        rate_hz=0.3,
        photons=photons,
        seed=seed,
    )
    return Movie(
        path=noisy_path,
        noisy=np.asarray(open_image(noisy_path).data, dtype=np.float32),
        truth=np.asarray(open_image(truth_path).data, dtype=np.float32),
        masks=read_masks(truth_path),
        offset=info.offset,
    )


# ------------------------------------------------------------------------------ baselines


@dataclass
class Axis:
    """One parameter of a filter: its grid, its natural lower bound, how to go further out."""

    name: str
    values: list[float]
    bound: float  # the smallest meaningful value (no filtering along this axis)
    up: Callable[[float], float]
    down: Callable[[float], float]
    top: float = math.inf  # the largest meaningful value (the filter spans the whole axis)


@dataclass
class Pick:
    """The best grid point for one metric."""

    metric: str
    params: dict[str, float]
    scores: dict[str, float]
    widened: list[str] = field(default_factory=list)
    at_bound: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        notes = []
        if self.widened:
            notes.append("grid widened along " + ", ".join(self.widened))
        if self.at_bound:
            notes.append("at the natural end of " + ", ".join(self.at_bound))
        return text + (f" ({'; '.join(notes)})" if notes else "")


def tune(
    movie: Movie,
    apply: Callable[..., np.ndarray],
    axes: Sequence[Axis],
    *,
    max_widen: int = 20,
    metrics: Sequence[str] = METRICS,
) -> dict[str, Pick]:
    """Oracle-tune a filter on a grid, separately for each metric, widening edge picks."""
    cache: dict[tuple[float, ...], dict[str, float]] = {}
    picks: dict[str, Pick] = {}
    for metric in metrics:
        grids = [list(a.values) for a in axes]
        widened: list[str] = []
        for _ in range(max_widen + 1):
            for point in itertools.product(*grids):
                if point not in cache:
                    cache[point] = movie.score(apply(movie.noisy, *point))
            best = max(itertools.product(*grids), key=lambda p: cache[p][metric])
            grew = False
            for i, axis in enumerate(axes):
                if best[i] == grids[i][-1] and grids[i][-1] < axis.top:
                    grids[i].append(min(axis.top, axis.up(grids[i][-1])))
                    grew = True
                elif best[i] == grids[i][0] and grids[i][0] > axis.bound:
                    grids[i].insert(0, max(axis.bound, axis.down(grids[i][0])))
                    grew = True
                else:
                    continue
                widened.append(axis.name)
            if not grew:
                break
        else:
            raise RuntimeError(f"the {metric} pick still sits at a grid edge: {best}")
        picks[metric] = Pick(
            metric=metric,
            params={a.name: v for a, v in zip(axes, best, strict=True)},
            scores=cache[best],
            widened=sorted(set(widened)),
            at_bound=[a.name for a, v in zip(axes, best, strict=True) if v in (a.bound, a.top)],
        )
    return picks


def gaussian(noisy: np.ndarray, sigma_t: float, sigma_yx: float) -> np.ndarray:
    return ndimage.gaussian_filter(noisy, (sigma_t, sigma_yx, sigma_yx))


def gaussian_2d(noisy: np.ndarray, sigma_yx: float) -> np.ndarray:
    """Frame by frame (sigma_t = 0): what a user filtering each frame would do."""
    return ndimage.gaussian_filter(noisy, (0.0, sigma_yx, sigma_yx))


def median(noisy: np.ndarray, size_t: float, size_yx: float) -> np.ndarray:
    return ndimage.median_filter(noisy, size=(int(size_t), int(size_yx), int(size_yx)))


def gaussian_axes(frames: int) -> list[Axis]:
    # sigma_t beyond the movie's length is its time average: the natural top of that axis.
    return [
        Axis(
            "sigma_t",
            [0.0, 0.5, 1.0, 1.5, 2.0],
            0.0,
            lambda v: 1.5 * v,
            lambda v: v - 0.5,
            top=float(frames),
        ),
        Axis(
            "sigma_yx",
            [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0],
            0.0,
            lambda v: 1.5 * v,
            lambda v: v / 2,
        ),
    ]


def median_axes(frames: int) -> list[Axis]:
    # a window of 2 x frames - 1 covers the whole movie from every frame (reflected ends)
    return [
        Axis("size_t", [1, 3, 5], 1, lambda v: 2 * v + 1, lambda v: v - 2, top=2 * frames - 1),
        Axis("size_yx", [3, 5], 1, lambda v: v + 2, lambda v: v - 2),
    ]


# ------------------------------------------------------------------------------ srdvol


class Fitted(NamedTuple):
    """What :func:`fit` returns."""

    losses: list[float]
    wall_s: float
    cpu_s: float


class RecordingTrainer(Trainer):
    """srdvol's Trainer, keeping every loss (to tell a diverged run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def step(self, batch: np.ndarray) -> float:
        loss = super().step(batch)
        self.losses.append(loss)
        return loss


def fit(
    movie: Movie,
    model: Path,
    *,
    network: str,
    patch: tuple[int, int, int],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    loss: str | None = None,
    device: str,
    grad_clip: float | None = GRAD_CLIP,
) -> Fitted:
    """Train exactly as :func:`srdvol.train` does (its two steps), with ``grad_clip`` as given.
    Returns the losses, the wall seconds and the process CPU seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    options = TrainOptions(
        patch=patch,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **({"loss": loss} if loss else {}),
        network=NETWORKS[network](patch[0]),
        overwrite=True,
        checkpoint_every=max(steps, 1),
    )
    plan = prepare_training(movie.path, model, options)
    trainers: list[RecordingTrainer] = []
    run_training(
        plan,
        device=resolve_device(device),
        make_trainer=functools.partial(RecordingTrainer, grad_clip=grad_clip),
        on_finish=trainers.append,
    )
    return Fitted(trainers[0].losses, time.perf_counter() - started, time.process_time() - cpu)


def subgrid_prediction(
    noisy: np.ndarray, predictor: ModelPredictor, patch: tuple[int, int, int], overlap: float
) -> np.ndarray:
    """Denoise each of the four half-resolution sub-grids on its own, then interleave them."""
    out = np.empty(noisy.shape, dtype=np.float32)
    half = (patch[0], patch[1] // 2, patch[2] // 2)
    for i, j in itertools.product(range(2), range(2)):
        sub = np.ascontiguousarray(noisy[:, i::2, j::2])
        out[:, i::2, j::2] = predict_array(sub, predictor, patch=half, overlap=overlap)
    return out


# ------------------------------------------------------------------------------ one seed


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def run_seed(photons: float, seed: int, args: argparse.Namespace, root: Path) -> list[dict]:
    movie = make_movie(root, photons=photons, seed=seed, frames=args.frames, size=args.size)
    rows: list[dict] = []

    def row(method: str, scores: dict[str, float], **extra: Any) -> None:
        rows.append(
            {
                "photons": photons,
                "seed": seed,
                "method": method,
                **{k: scores[k] for k in COLUMNS if k in scores},
                **extra,
            }
        )

    row("noisy input", movie.score(movie.noisy))
    filters = {
        "gaussian2d": ("Gaussian 2D", gaussian_2d, gaussian_axes(args.frames)[1:]),
        "gaussian": ("Gaussian 3D", gaussian, gaussian_axes(args.frames)),
        "median": ("median", median, median_axes(args.frames)),
    }
    for name, apply, axes in (filters[b] for b in args.baselines):
        for metric, pick in tune(movie, apply, axes, metrics=args.tune_for).items():
            row(f"{name}, best for {LABELS[metric]}", pick.scores, params=pick.describe())

    patch = (args.patch_t, args.patch_yx, args.patch_yx)
    model = root / f"model-{photons:g}-{seed}.safetensors"
    before = load()
    losses, trained, cpu = fit(
        movie,
        model,
        network=args.network,
        patch=patch,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        loss=args.loss,
        seed=seed if args.train_seed is None else args.train_seed,
        device=args.device,
    )
    plain_anchor = DEFAULT_ANCHOR if args.anchor is None else args.anchor
    predictor = ModelPredictor(model, device=args.device, batch_size=4, anchor=plain_anchor)
    started = time.perf_counter()
    denoised = predict_array(movie.noisy, predictor, patch=patch, overlap=args.overlap)
    predicted = time.perf_counter() - started
    timing = {
        "train_s": round(trained, 1),
        "train_cpu_s": round(cpu, 1),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "patch": list(patch),
        "loss": args.loss or "srdvol default",
        "predict_s": round(predicted, 1),
        "load_before": before,
        "load_after": load(),
        "final_loss": losses[-1],
        **({"train_seed": args.train_seed} if args.train_seed is not None else {}),
    }
    settings = f"overlap {args.overlap:g}, anchor {plain_anchor:g}"
    row("srdvol", movie.score(denoised), params=settings, **timing)
    if plain_anchor:
        network_only = ModelPredictor(model, device=args.device, batch_size=4)
        own = predict_array(movie.noisy, network_only, patch=patch, overlap=args.overlap)
        row("srdvol, --anchor 0", movie.score(own), params=f"overlap {args.overlap:g}")
    if args.guide:
        # as srdvol predict --guide runs it: the shaped anchor, at its own default sigma
        anchor = default_anchor(args.guide) if args.anchor is None else args.anchor
        guided = ModelPredictor(
            model, device=args.device, batch_size=4, anchor=anchor, guide=args.guide
        )
        estimate = predict_array(movie.noisy, guided, patch=patch, overlap=args.overlap)
        params = f"overlap {args.overlap:g}, anchor {anchor:g} shaped"
        row(f"srdvol --guide {args.guide}", movie.score(estimate), params=params)
    if args.subgrid:
        started = time.perf_counter()
        sub = subgrid_prediction(movie.noisy, predictor, patch, args.overlap)
        row(
            "srdvol, sub-grid inference",
            movie.score(sub),
            params=f"overlap {args.overlap:g}",
            predict_s=round(time.perf_counter() - started, 1),
            load_after=load(),
        )
    return rows


# ------------------------------------------------------------------------------ report


def spread(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return (
        f"{mean:.{digits}f} ± {sd:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
    )


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _timing(r: dict) -> str:
    parts = [
        r.get("params"),
        f"train {r['train_cpu_s']} s CPU / {r['train_s']} s wall" if "train_cpu_s" in r else None,
        f"predict {r['predict_s']} s" if "predict_s" in r else None,
        f"load {r['load_before']} -> {r['load_after']}"
        if "load_before" in r
        else (f"load {r['load_after']}" if "load_after" in r else None),
    ]
    return "; ".join(str(x) for x in parts if x)


def report(rows: list[dict]) -> str:
    per_run = markdown(
        ["photons", "seed", "method", *(LABELS[k] for k in COLUMNS), "parameters / timing"],
        [
            [
                f"{r['photons']:g}",
                r["seed"],
                r["method"],
                *(f"{r.get(k, math.nan):.{DIGITS[k]}f}" for k in COLUMNS),
                _timing(r),
            ]
            for r in rows
        ],
    )
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["photons"], r["method"]), []).append(r)
    summary = markdown(
        ["photons", "method", "seeds", *(f"{LABELS[k]}: mean ± sd (min-max)" for k in COLUMNS)],
        [
            [
                f"{photons:g}",
                method,
                len(g),
                *(spread([r.get(k, math.nan) for r in g], DIGITS[k]) for k in COLUMNS),
            ]
            for (photons, method), g in groups.items()
        ],
    )
    return f"{per_run}\n\nSummary over seeds:\n\n{summary}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--size", type=int, default=96, help="frame size (pixels, square)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="default: srdvol's default")
    parser.add_argument("--patch-t", type=int, default=16)
    parser.add_argument("--patch-yx", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP)
    parser.add_argument(
        "--anchor",
        type=float,
        default=None,
        help=f"srdvol predict --anchor SIGMA (default {DEFAULT_ANCHOR:g}; with --guide, "
        "the guided default)",
    )
    parser.add_argument(
        "--guide", type=int, default=0, help="also score srdvol predict --guide RADIUS"
    )
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="seed of training (default: the movie's seed); another one trains another model on "
        "the same movie",
    )
    parser.add_argument("--network", choices=sorted(NETWORKS), default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--subgrid", action="store_true", help="also score sub-grid inference")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=None)
    parser.add_argument(
        "--tune-for",
        nargs="+",
        choices=METRICS,
        default=list(METRICS),
        help="scores the baselines are tuned for (SSIM's pick widens to the time average: slow "
        "on long movies)",
    )
    parser.add_argument(
        "--loss", choices=("mse", "l1mse"), default=None, help="default: srdvol's default"
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=("gaussian2d", "gaussian", "median"),
        default=["gaussian", "median"],
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the models and movies in --workdir (default: a temporary folder inside it)",
    )
    args = parser.parse_args()
    if args.lr is None:
        from srdvol.options import DEFAULT_LR

        args.lr = DEFAULT_LR
    if args.budget:
        for key, value in BUDGETS[args.budget].items():
            if value is not None:
                setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.keep and args.workdir is None:
        parser.error("--keep needs --workdir")
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.workdir))
        if args.keep
        else tempfile.TemporaryDirectory(dir=args.workdir)
    ) as tmp:
        for photons, seed in itertools.product(args.photons, args.seeds):
            rows += run_seed(photons, seed, args, Path(tmp))
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, default=str))
    print(
        f"\nSimulated 0.3 Hz calcium imaging, {args.frames} frames of {args.size}x{args.size}; "
        f"{args.network} network, {args.steps} steps x {args.batch_size} patches "
        f"({args.patch_t}, {args.patch_yx}, {args.patch_yx}), lr {args.lr:g}, "
        f"{torch.get_num_threads()} torch thread(s)\n"
    )
    print(report(rows))


if __name__ == "__main__":
    main()
