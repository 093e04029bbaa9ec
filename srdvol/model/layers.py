"""Convolutional parts of the SRDTrans network: the time-only encoder and decoder.

The encoder halves the time axis at every level and keeps y and x (fluorescence movies need
full spatial resolution; the method's spatial sub-sampling happens in the data, not in the
network). The decoder doubles time back with transposed convolutions and adds the skips.

Two CPU speed-ups live in :class:`TimeConv3d` and :class:`TimeConvTranspose3d`; both compute
the same function as plain ``Conv3d`` / ``ConvTranspose3d`` (same parameters, outputs equal to
float rounding):

- channels-last layout: oneDNN's 3D convolutions (above all their weight gradients) run 1.2-2x
  faster on channels-last tensors, most for the narrow full-time levels;
- one frame in or out: at the bottleneck of a 16-frame patch time has length 1, so two of the
  three time taps of a 3x3x3 kernel only ever see zero padding. Such a convolution is a 2D
  convolution with the live taps stacked on the channels, and skips a third to a half of the
  work;
- a batch of one: torch sends a one-sample 3D convolution (and transposed convolution) to its
  slow reference kernels (``Slow3d``), 7-12x slower per voxel than oneDNN's for the same voxels
  in a batch of two (benchmarks/RESULTS.md, issue 13). A one-sample input is cut into its top
  and bottom halves along y, each with the rows the kernel reaches across the cut, and the two
  halves run as a batch of two; their outputs are put back together. This is what made a
  training step on one (64, 64, 64) patch cost 3x a step on four (16, 64, 64) patches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBlock",
    "Decoder",
    "Encoder",
    "TimeConv3d",
    "TimeConvTranspose3d",
    "conv3",
]

#: Negative slope of every LeakyReLU in the conv blocks (as in the method description).
LEAK = 0.1


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU; any layout elsewhere (not measured on GPUs, left as given).

    A one-channel tensor is made plain contiguous instead (the two layouts hold the same bytes):
    explicit channels-last strides there hand the first convolution's weight a gradient whose
    strides differ from the weight's in a size-1 axis, which DistributedDataParallel's gradient
    buckets warn about.
    """
    if x.device.type != "cpu":
        return x
    if x.shape[1] == 1:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last_3d)


def _splits_rows(module: nn.Module, x: torch.Tensor) -> int | None:
    """The halo (rows the kernel reaches across a cut along y) when a one-sample CPU input is
    worth running as two halves; ``None`` otherwise."""
    kh = module.kernel_size[1]
    if torch.jit.is_tracing():
        return None  # a trace (zoo export) would fix the batch of one it saw
    if x.device.type != "cpu" or x.shape[0] != 1 or x.shape[3] < 8 or kh % 2 == 0:
        return None
    plain = module.groups == 1 and module.dilation == (1, 1, 1)
    if not (plain and module.padding_mode == "zeros" and isinstance(module.padding, tuple)):
        return None
    if module.stride[1] != 1 or module.padding[1] != kh // 2:
        return None
    return kh // 2


def _in_two_halves(x: torch.Tensor, halo: int, run: Any) -> torch.Tensor:
    """``run(x)`` for a one-sample ``x`` of (1, C, T, Y, X), computed as a batch of two halves
    along y (each with ``halo`` rows beyond the cut); equal to ``run(x)`` for a convolution of
    stride 1 and 'same' zero padding along y."""
    rows = x.shape[3]
    if rows % 2:
        x = F.pad(x, (0, 0, 0, 1))  # one more zero row: what the padding holds anyway
    half = x.shape[3] // 2
    pair = torch.cat([x[:, :, :, : half + halo], x[:, :, :, half - halo :]], dim=0)
    out = run(_channels_last(pair))
    return torch.cat([out[:1, :, :, :half], out[1:, :, :, halo:]], dim=3)[:, :, :, :rows]


class TimeConv3d(nn.Conv3d):
    """``nn.Conv3d`` (zero padding, no dilation or groups) that is faster on the CPU.

    Same parameters and function as ``nn.Conv3d``; see the module docstring for the two
    speed-ups. Dilated, grouped or non-zero-padded convolutions take the plain path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _channels_last(x)
        taps = self._live_taps(x.shape[2])
        if taps is None:
            halo = _splits_rows(self, x)
            if halo is not None:
                return _in_two_halves(x, halo, lambda pair: nn.Conv3d.forward(self, pair))
            return super().forward(x)
        first, last = taps
        frames = last - first  # input frames 0..frames-1 meet kernel taps first..last-1
        b, c, _, h, w = x.shape
        stacked = x[:, :, :frames].reshape(b, c * frames, h, w)
        weight = self.weight[:, :, first:last].reshape(
            self.out_channels, c * frames, *self.kernel_size[1:]
        )
        out = F.conv2d(stacked, weight, self.bias, stride=self.stride[1:], padding=self.padding[1:])
        return out.unsqueeze(2)

    def _live_taps(self, frames: int) -> tuple[int, int] | None:
        """Kernel taps ``[first, last)`` that meet real frames when the output has one frame."""
        if self.groups != 1 or self.dilation != (1, 1, 1) or self.padding_mode != "zeros":
            return None
        if not isinstance(self.padding, tuple):
            return None  # "same"/"valid" strings: leave to the plain path
        k, pad, step = self.kernel_size[0], self.padding[0], self.stride[0]
        if (frames + 2 * pad - k) // step + 1 != 1:
            return None
        first, last = pad, min(k, frames + pad)  # frame t = tap - pad must lie in 0..frames-1
        return (first, last) if last - first < k else None


class TimeConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` (zero padding, no dilation or groups) that is faster on the CPU.

    Same parameters and function; with one input frame, output frame ``o`` comes from kernel
    tap ``o + padding`` alone, so the whole layer is one 2D transposed convolution whose output
    channels are (channel, frame) pairs.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = _channels_last(x)
        if output_size is not None or not self._one_frame_in(x.shape[2]):
            halo = None if output_size is not None else _splits_rows(self, x)
            if halo is not None:
                plain = nn.ConvTranspose3d.forward
                return _in_two_halves(x, halo, lambda pair: plain(self, pair))
            return super().forward(x, output_size)
        k, pad = self.kernel_size[0], self.padding[0]
        frames = k - 2 * pad + self.output_padding[0]
        weight = self.weight[:, :, pad : pad + frames]  # (in, out, frames, kh, kw)
        weight = weight.reshape(self.in_channels, self.out_channels * frames, *self.kernel_size[1:])
        out = F.conv_transpose2d(
            x[:, :, 0],
            weight,
            stride=self.stride[1:],
            padding=self.padding[1:],
            output_padding=self.output_padding[1:],
        )
        out = out.reshape(x.shape[0], self.out_channels, frames, *out.shape[-2:])
        return out if self.bias is None else out + self.bias[:, None, None, None]

    def _one_frame_in(self, frames: int) -> bool:
        k, pad = self.kernel_size[0], self.padding[0]
        return (
            frames == 1
            and self.groups == 1
            and self.dilation == (1, 1, 1)
            and self.padding_mode == "zeros"
            and self.output_padding[0] == 0
            and 0 < k - 2 * pad
        )


def conv3(
    in_channels: int, out_channels: int, *, stride: tuple[int, int, int] = (1, 1, 1)
) -> nn.Conv3d:
    """A 3x3x3 convolution that keeps y and x (padding 1) and strides only where asked."""
    return TimeConv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


class ConvBlock(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by LeakyReLU(0.1).

    Parameters
    ----------
    in_channels, mid_channels, out_channels
        Channels before, between and after the two convolutions.
    last_linear
        Leave the activation off the second convolution (used for the network's output head).
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, *, last_linear: bool = False
    ) -> None:
        layers: list[nn.Module] = [
            conv3(in_channels, mid_channels),
            nn.LeakyReLU(LEAK),
            conv3(mid_channels, out_channels),
        ]
        if not last_linear:
            layers.append(nn.LeakyReLU(LEAK))
        super().__init__(*layers)


class Encoder(nn.Module):
    """Conv levels that keep a skip and then halve time with a (2, 1, 1)-strided conv.

    Parameters
    ----------
    channels
        Output channels of each level; the input has one channel.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        levels = []
        downs = []
        previous = 1
        for width in channels:
            # The first conv widens to half the level width (never narrower than its input),
            # which keeps the full-resolution level cheap.
            levels.append(ConvBlock(previous, max(width // 2, previous), width))
            downs.append(nn.Sequential(conv3(width, width, stride=(2, 1, 1)), nn.LeakyReLU(LEAK)))
            previous = width
        self.levels = nn.ModuleList(levels)
        self.downs = nn.ModuleList(downs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the coarsest tensor (time / 2**levels) and the skips, finest first."""
        skips = []
        for level, down in zip(self.levels, self.downs, strict=True):
            x = level(x)
            skips.append(x)
            x = down(x)
        return x, skips


class Decoder(nn.Module):
    """Levels that double time (transposed conv), add the skip and apply two convs.

    The last level ends in a linear convolution to one channel: the network works on
    zero-mean normalised intensities, so its output must be free to go negative (a final
    LeakyReLU would bias dark pixels).

    Parameters
    ----------
    channels
        The encoder's channels, finest first.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        ups = []
        levels = []
        for index in reversed(range(len(channels))):
            width = channels[index]
            # Kernel 4, stride 2, padding 1 along t gives exactly 2*T; 3/1/1 keeps y and x.
            ups.append(
                TimeConvTranspose3d(
                    width, width, kernel_size=(4, 3, 3), stride=(2, 1, 1), padding=(1, 1, 1)
                )
            )
            if index > 0:
                out = channels[index - 1]
                levels.append(ConvBlock(width, out, out))
            else:
                levels.append(ConvBlock(width, width, 1, last_linear=True))
        self.ups = nn.ModuleList(ups)
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decode ``x`` with the encoder's ``skips`` (finest first) to one channel."""
        for up, level, skip in zip(self.ups, self.levels, reversed(skips), strict=True):
            x = level(up(x) + skip)
        return x
