"""The SRDTrans network (its sizes: :class:`srdvol.model.config.NetworkConfig`).

A 3D conv encoder that halves only time (4 levels by default), a bottleneck with a temporal
transformer (each pixel a sequence of ``patch_t / 16`` tokens) followed by a Swin spatial
transformer on every coarse frame, and a decoder that doubles time back with transposed convs
and additive skips. Input and output are ``(B, 1, T, Y, X)`` float tensors with
``T == patch_t`` and any ``Y``, ``X``. About 1.8 M parameters at the default width.
"""

from __future__ import annotations

import torch
from torch import nn

from srdvol.errors import ModelMismatchError, flag
from srdvol.model.attention import SpatialTransformer, TemporalTransformer
from srdvol.model.config import NetworkConfig
from srdvol.model.layers import LEAK, Decoder, Encoder, conv3

__all__ = ["SRDTransNetwork", "build_network", "count_parameters"]


class SRDTransNetwork(nn.Module):
    """SRDTrans: time-only conv U-Net with a temporal + Swin transformer bottleneck.

    Parameters
    ----------
    config
        Network sizes.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        top = config.channels[-1]
        dim = config.embed_dim
        self.encoder = Encoder(config.channels)
        self.conv_in = nn.Sequential(conv3(top, dim), nn.LeakyReLU(LEAK))
        self.temporal = TemporalTransformer(
            dim,
            config.patch_t // config.time_factor,
            depth=config.temporal_depth,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            attn_dropout=config.attn_dropout,
        )
        self.spatial = SpatialTransformer(
            dim,
            depth=config.spatial_depth,
            heads=config.heads,
            window=config.window,
            shift=config.shift,
            mlp_ratio=config.mlp_ratio,
            attn_dropout=config.attn_dropout,
        )
        self.conv_out = nn.Sequential(conv3(dim, top), nn.LeakyReLU(LEAK))
        self.decoder = Decoder(config.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise ``(B, 1, patch_t, Y, X)`` normalised intensities; same shape out.

        Raises
        ------
        ModelMismatchError
            If the input is not 5D with one channel and ``patch_t`` frames.
        """
        t = self.config.patch_t
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2] != t:
            raise ModelMismatchError(
                flag("patch"),
                f"the network takes (batch, 1, {t}, y, x) input and got {tuple(x.shape)}",
                f"use patches of {t} frames ({flag('patch')} {t},Y,X), the model's size",
            )
        coarse, skips = self.encoder(x)
        coarse = self.conv_in(coarse)
        coarse = self.spatial(self.temporal(coarse))
        return self.decoder(self.conv_out(coarse), skips)


def build_network(config: NetworkConfig) -> SRDTransNetwork:
    """Build a freshly initialised SRDTrans network (float32, on the CPU).

    Parameters
    ----------
    config
        Network sizes, including ``patch_t``.

    Returns
    -------
    SRDTransNetwork
        The module; input and output ``(B, 1, patch_t, Y, X)``.
    """
    return SRDTransNetwork(config)


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
