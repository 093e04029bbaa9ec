"""Would torch's channels-last 3D memory format speed up CPU training? (issue 13's per-voxel cost)

Times, in CPU ms with one torch thread: one 3x3x3 convolution (forward, backward) at the shapes
of the default network's levels for a batch of 2 of (32, 64, 64) patches, in the default
(contiguous) and the ``channels_last_3d`` format; then a whole training step of the default
network (forward, MSE loss, backward, Adam) with the network and its input in each format::

    python benchmarks/channels_last.py
"""

from __future__ import annotations

import statistics
import time

import torch

from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network

CHANNELS_LAST = torch.channels_last_3d


def convolution_ms(
    channels: int, frames: int, last: bool, repeats: int = 10
) -> tuple[float, float]:
    """Median forward and backward CPU ms of one convolution on ``(2, C, T, 32, 32)``."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
    x = torch.randn(2, channels, frames, 32, 32)
    if last:
        conv, x = conv.to(memory_format=CHANNELS_LAST), x.to(memory_format=CHANNELS_LAST)
    x.requires_grad_()
    forward, backward = [], []
    for i in range(repeats + 2):
        started = time.process_time()
        y = conv(x)
        middle = time.process_time()
        y.sum().backward()
        if i >= 2:  # the first two warm the kernels up
            forward.append(middle - started)
            backward.append(time.process_time() - middle)
    return 1000 * statistics.median(forward), 1000 * statistics.median(backward)


def step_ms(last: bool, steps: int = 8) -> float:
    """Median CPU ms of a training step of the default network on a batch of 2."""
    torch.manual_seed(0)
    network = build_network(NetworkConfig(patch_t=32))
    x = torch.randn(2, 1, 32, 32, 32)  # (32, 64, 64) patches split into their 2x2 sub-grids
    if last:
        network, x = network.to(memory_format=CHANNELS_LAST), x.to(memory_format=CHANNELS_LAST)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    times = []
    for i in range(steps + 2):
        started = time.process_time()
        loss = (network(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.process_time() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    print("| convolution input | contiguous fwd / bwd ms | channels-last fwd / bwd ms |")
    print("|---|---|---|")
    for channels, frames in ((8, 32), (16, 16), (32, 8), (64, 4), (128, 2)):
        plain, last = (
            convolution_ms(channels, frames, False),
            convolution_ms(channels, frames, True),
        )
        print(
            f"| (2, {channels}, {frames}, 32, 32) | {plain[0]:.1f} / {plain[1]:.1f} | "
            f"{last[0]:.1f} / {last[1]:.1f} |"
        )
    print(
        f"\ntraining step: contiguous {step_ms(False):.0f} ms, channels-last {step_ms(True):.0f} ms"
    )


if __name__ == "__main__":
    main()
