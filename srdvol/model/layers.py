"""Convolutional parts of the SRDTrans network: the time-only encoder and decoder.

The encoder halves the time axis at every level and keeps y and x (fluorescence movies need
full spatial resolution; the method's spatial sub-sampling happens in the data, not in the
network). The decoder doubles time back with transposed convolutions and adds the skips.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBlock", "Decoder", "Encoder", "conv3"]

#: Negative slope of every LeakyReLU in the conv blocks (as in the method description).
LEAK = 0.1


def conv3(
    in_channels: int, out_channels: int, *, stride: tuple[int, int, int] = (1, 1, 1)
) -> nn.Conv3d:
    """A 3x3x3 convolution that keeps y and x (padding 1) and strides only where asked."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)


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
                nn.ConvTranspose3d(
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
