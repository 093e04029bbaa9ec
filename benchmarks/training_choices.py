"""Why srdvol trains with lr 1e-3 and a clipped gradient norm: the learning-rate sweep and the
clipping comparison behind the defaults in :mod:`srdvol.training.loop`.

For every seed it simulates one 0.3 Hz calcium recording with ground truth (as
``benchmarks/quality.py`` does), then trains once per (learning rate, clipping) pair with
srdvol's own training path (:func:`quality.fit`: ``prepare_training`` + ``run_training``, the two
steps of :func:`srdvol.train`; clipping off passes ``grad_clip=None`` to the Trainer, nothing else
changes), predicts the whole movie at the command line's default overlap and scores it. A run
whose loss or output is not finite is reported as diverged. Timings are wall seconds with the
load average beside them; the scores do not depend on the load.

Run from the repository root (results: benchmarks/RESULTS.md)::

    python benchmarks/training_choices.py --network small --patch-yx 32 --steps 300 \\
        --lrs 1e-4 3e-4 1e-3 3e-3 1e-2 --clip on --seeds 0 --threads 1
    python benchmarks/training_choices.py --network default --patch-yx 64 --steps 150 \\
        --lrs 1e-3 3e-3 --clip on off --seeds 0 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from quality import NETWORKS, fit, gaussian, gaussian_axes, load, make_movie, markdown, tune

from srdvol.options import DEFAULT_OVERLAP
from srdvol.predict.block import predict_array
from srdvol.predict.predictors import ModelPredictor
from srdvol.training.trainer import GRAD_CLIP


def run(args: argparse.Namespace, root: Path) -> list[dict]:
    rows: list[dict] = []
    patch = (args.patch_t, args.patch_yx, args.patch_yx)
    for seed in args.seeds:
        movie = make_movie(
            root, photons=args.photons, seed=seed, frames=args.frames, size=args.size
        )
        noisy = movie.score(movie.noisy)
        best = tune(movie, gaussian, gaussian_axes(args.frames))["snr_db"]
        rows.append({"seed": seed, "run": "noisy input", **noisy})
        rows.append({"seed": seed, "run": "Gaussian 3D, best for SNR", **best.scores})
        rows[-1]["note"] = best.describe()
        for lr, clip in itertools.product(args.lrs, args.clip):
            model = root / f"m-{seed}-{lr:g}-{clip}.safetensors"
            before = load()
            row = {"seed": seed, "run": f"lr {lr:g}, clipping {clip}", "lr": lr, "clip": clip}
            try:
                losses, seconds, _ = fit(
                    movie,
                    model,
                    network=args.network,
                    patch=patch,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=lr,
                    seed=seed,
                    device=args.device,
                    grad_clip=GRAD_CLIP if clip == "on" else None,
                )
            except Exception as exc:  # e.g. non-finite weights refused when the model is saved
                row.update(diverged=True, note=f"{type(exc).__name__}: {str(exc)[:120]}")
                rows.append(row)
                continue
            row.update(
                final_loss=losses[-1],
                max_loss=max(losses[len(losses) // 10 :]),  # after the warm-up
                train_s=round(seconds, 1),
                load=f"{before} -> {load()}",
            )
            denoised = predict_array(
                movie.noisy,
                ModelPredictor(model, device=args.device, batch_size=4),
                patch=patch,
                overlap=args.overlap,
            )
            if not (math.isfinite(losses[-1]) and np.isfinite(denoised).all()):
                row.update(diverged=True, note="loss or output not finite")
            else:
                row.update(diverged=False, **movie.score(denoised))
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args), "rows": rows}, default=str))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--clip", choices=["on", "off"], nargs="+", default=["on"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--photons", type=float, default=2.0)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="frame size (pixels, square)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patch-t", type=int, default=16)
    parser.add_argument("--patch-yx", type=int, default=32)
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = run(args, Path(tmp))
    print(
        f"\nSimulated 0.3 Hz calcium imaging, {args.frames} frames of {args.size}x{args.size}, "
        f"{args.photons:g} photons; {args.network} network, {args.steps} steps x "
        f"{args.batch_size} patches ({args.patch_t}, {args.patch_yx}, {args.patch_yx}), overlap "
        f"{args.overlap:g}, {torch.get_num_threads()} torch thread(s)\n"
    )

    def cell(row: dict, key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else ""

    print(
        markdown(
            ["seed", "run", "SNR dB", "SSIM", "trace r", "final loss", "max loss", "notes"],
            [
                [
                    r["seed"],
                    r["run"],
                    cell(r, "snr_db", 2),
                    cell(r, "ssim", 3),
                    cell(r, "trace_r", 3),
                    cell(r, "final_loss", 4),
                    cell(r, "max_loss", 4),
                    "; ".join(
                        str(x)
                        for x in (
                            "DIVERGED" if r.get("diverged") else None,
                            r.get("note"),
                            f"train {r['train_s']} s, load {r['load']}" if "train_s" in r else None,
                        )
                        if x
                    ),
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
