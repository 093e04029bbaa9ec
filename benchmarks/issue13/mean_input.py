"""Does the network learn dim data faster when it sees the mean image too? (issue 13, photons 0.5)

``ceiling.py`` shows what photons 0.5 lacks: an estimator that knows every source's footprint
meets every target, one that knows only the cells' masks does not. A network sees footprints
only through its noisy input, where at 0.5 photons a cell's outline is barely there in any one
patch; the recording's mean image shows it almost without noise. This experiment trains the
same network (default widths, ``--patch 32,64,64``, batch 2, srdvol's optimiser, schedule,
spatial pairs, augmentation and MSE loss) in two variants from the same seed:

- ``plain``: one input channel, the noisy patch (srdvol's network);
- ``mean``: two input channels, the noisy patch and the mean image of the whole recording
  (:func:`~srdvol.predict.guide.mean_image`, in the same normalised units, the same for every
  frame; the spatial pairs take it at the input pixel of every 2x2 cell, like the input). Only
  the first convolution changes (two input channels instead of one).

Patches are drawn uniformly from the movie in memory (not srdvol's reader), and prediction
covers whole frames with windows of ``patch_t`` frames every ``patch_t / 2``, blended with a
triangular window in t: the same for both variants, so they compare with each other, not
exactly with ``srdvol train``. Each prediction is scored alone, after ``--guide 2``, after the
plain and the shaped anchor, and after ``--guide 2`` with the shaped anchor (``inference.py``'s
functions, whole frames). The prediction is kept in
``WORKDIR/mean-input-VARIANT-STEPS-TAG-SEED.npy`` (``--load`` scores it again). One JSON line
per row, as ``inference.py`` writes them (``acceptance.py`` reads them). Run from the
repository root::

    python benchmarks/issue13/mean_input.py /tmp/srdvol-anchor 0.5-0 --variant mean \
        --steps 1000 --threads 1 > mean-input.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference import anchored, guided_frames

from srdvol.core.metrics import evaluate
from srdvol.core.normalize import Statistics, denormalize, normalize
from srdvol.model.config import NetworkConfig
from srdvol.model.layers import ConvBlock
from srdvol.model.network import build_network
from srdvol.ngff.labels import read_masks
from srdvol.ngff.read import open_image
from srdvol.predict.guide import mean_image
from srdvol.training.pairs import SPATIAL_TRIPLES, random_dihedral, spatial_loss
from srdvol.training.trainer import BETAS, GRAD_CLIP, lr_factor

SCORES = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")


class MeanInputNetwork(nn.Module):
    """srdvol's network with ``channels`` input channels (its first convolution widened)."""

    def __init__(self, config: NetworkConfig, channels: int) -> None:
        super().__init__()
        self.net = build_network(config)
        if channels > 1:
            first = config.channels[0]
            self.net.encoder.levels[0] = ConvBlock(channels, max(first // 2, channels), first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        coarse, skips = net.encoder(x)
        coarse = net.spatial(net.temporal(net.conv_in(coarse)))
        return net.decoder(net.conv_out(coarse), skips)


def spatial_pairs_with_guide(x: torch.Tensor, generator: torch.Generator) -> tuple:
    """Spatial pairs of channel 0 of ``(B, C, T, Y, X)``; every channel sampled at the input."""
    b, c, t, h, w = x.shape
    cells = x.reshape(b, c, t, h // 2, 2, w // 2, 2).transpose(-3, -2)
    cells = cells.reshape(b, c, t, h // 2, w // 2, 4)
    choice = torch.randint(0, len(SPATIAL_TRIPLES), (b, 1, t, h // 2, w // 2), generator=generator)
    picks = torch.tensor(SPATIAL_TRIPLES)[choice]  # (b, 1, t, h/2, w/2, 3)
    inputs = torch.gather(cells, -1, picks[..., :1].expand(b, c, t, h // 2, w // 2, 1))[..., 0]
    targets = torch.gather(cells[:, :1], -1, picks[..., 1:])
    return inputs, targets[:, 0, ..., 0], targets[:, 0, ..., 1]


def stacked(movie: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    """``(C, T, Y, X)``: the movie, and the mean image repeated over its frames if given."""
    if image is None:
        return movie[None]
    return np.stack([movie, np.broadcast_to(image, movie.shape)])


def train(data: np.ndarray, config: NetworkConfig, args: argparse.Namespace) -> nn.Module:
    """srdvol's training recipe on uniform random patches of ``data`` ``(C, T, Y, X)``."""
    torch.manual_seed(args.seed)
    network = MeanInputNetwork(config, len(data))
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr, betas=BETAS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pt, py, px = args.patch
    _, frames, height, width = data.shape
    network.train()
    for step in range(args.steps):
        corners = zip(
            rng.integers(0, frames - pt + 1, args.batch_size),
            rng.integers(0, height - py + 1, args.batch_size),
            rng.integers(0, width - px + 1, args.batch_size),
            strict=True,
        )
        batch = np.stack([data[:, t : t + pt, y : y + py, x : x + px] for t, y, x in corners])
        batch = random_dihedral(torch.from_numpy(batch), generator=generator)
        inputs, target_a, target_b = spatial_pairs_with_guide(batch, generator)
        loss = spatial_loss(network(inputs)[:, 0], target_a, target_b, kind="mse")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {float(loss):.4f}", file=sys.stderr, flush=True)
    return network


@torch.inference_mode()
def predict(network: nn.Module, data: np.ndarray, patch_t: int) -> np.ndarray:
    """Whole frames, windows of ``patch_t`` frames every ``patch_t / 2``, triangular blend."""
    network.eval()
    _, frames, height, width = data.shape
    total = np.zeros((frames, height, width), np.float64)
    weights = np.zeros(frames, np.float64)
    ramp = 1.0 - np.abs(np.arange(patch_t) + 0.5 - patch_t / 2) / (patch_t / 2) + 1e-3
    starts = sorted({*range(0, frames - patch_t + 1, patch_t // 2), frames - patch_t})
    for start in starts:
        window = torch.from_numpy(np.ascontiguousarray(data[None, :, start : start + patch_t]))
        out = network(window)[0, 0].numpy()
        total[start : start + patch_t] += ramp[:, None, None] * out
        weights[start : start + patch_t] += ramp
    return (total / weights[:, None, None]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="holds noisy-TAG.zarr and truth-TAG.zarr")
    parser.add_argument("tag", help="PHOTONS-SEED of the movie")
    parser.add_argument("--variant", choices=("plain", "mean"), required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="of the training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchors", type=float, nargs="+", default=[3, 4, 4.5])
    parser.add_argument("--load", action="store_true", help="score the saved prediction again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    noisy = np.asarray(open_image(args.workdir / f"noisy-{args.tag}.zarr").data, np.float32)
    truth = np.asarray(open_image(args.workdir / f"truth-{args.tag}.zarr").data, np.float32)
    masks = read_masks(args.workdir / f"truth-{args.tag}.zarr")
    stats = Statistics(mean=float(noisy.mean()), std=float(noisy.std()))
    image = normalize(mean_image(noisy), stats) if args.variant == "mean" else None
    data = stacked(normalize(noisy, stats), image)
    saved = args.workdir / f"mean-input-{args.variant}-{args.steps}-{args.tag}-{args.seed}.npy"
    if args.load:
        estimate, wall, cpu = np.load(saved), math.nan, math.nan
    else:
        config = NetworkConfig(patch_t=args.patch[0])
        wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
        network = train(data, config, args)
        wall = time.perf_counter() - wall
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu
        estimate = denormalize(predict(network, data, args.patch[0]), stats)
        np.save(saved, estimate)
    first = guided_frames(estimate, noisy, 2)
    rows = [(f"{args.variant} alone", estimate), (f"{args.variant} guide 2", first)]
    for sigma in args.anchors:
        rows += [
            (f"{args.variant} anchor {sigma:g}", anchored(estimate, noisy, sigma)),
            (f"{args.variant} shaped {sigma:g}", anchored(estimate, noisy, sigma, True)),
            (f"{args.variant} guide 2 shaped {sigma:g}", anchored(first, noisy, sigma, True)),
        ]
    for name, movie in rows:
        scores = evaluate(movie, truth, masks=masks, offset=100.0)
        line = {"model": args.tag, "method": f"mean-input {name}", "steps": args.steps}
        line |= {"train_seed": args.seed}
        line |= {"train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1)}
        print(json.dumps(line | {k: scores[k] for k in SCORES}), flush=True)


if __name__ == "__main__":
    main()
