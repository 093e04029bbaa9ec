"""The SRDTrans network and its configuration.

A 3D conv encoder that halves only time (4 levels by default), a bottleneck with a temporal
transformer (each pixel a sequence of ``patch_t / 16`` tokens) followed by a Swin spatial
transformer on every coarse frame, and a decoder that doubles time back with transposed convs
and additive skips. Input and output are ``(B, 1, T, Y, X)`` float tensors with
``T == patch_t`` and any ``Y``, ``X``. About 1.8 M parameters at the default width.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from srdvol.errors import ConfigError, ModelMismatchError
from srdvol.model.attention import SpatialTransformer, TemporalTransformer
from srdvol.model.layers import LEAK, Decoder, Encoder, conv3

__all__ = ["NetworkConfig", "SRDTransNetwork", "build_network", "count_parameters"]


class NetworkConfig(BaseModel):
    """Sizes of the SRDTrans network; every field is stored with the model."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    channels: tuple[int, ...] = Field((8, 16, 32, 64), min_length=1)
    """Channels of the encoder levels, finest first; each level halves time."""
    embed_dim: int = Field(128, ge=1)
    """Token width of the bottleneck transformers."""
    heads: int = Field(8, ge=1)
    """Attention heads in both transformers; must divide ``embed_dim``."""
    temporal_depth: int = Field(2, ge=0)
    """Layers of the temporal transformer."""
    spatial_depth: int = Field(2, ge=0)
    """Layers of the Swin transformer (every second one uses shifted windows)."""
    window: int = Field(7, ge=1)
    """Side of the square Swin attention window, in pixels."""
    shift: int = Field(3, ge=0)
    """Cyclic shift of the shifted-window layers; smaller than ``window``."""
    mlp_ratio: float = Field(4.0, gt=0)
    """Hidden width of the transformer MLPs relative to ``embed_dim``."""
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Attention dropout during training. 0 by default (upstream uses 0.1): a run is then
    exactly reproducible from its seed, and self-supervised noisy targets already regularise."""
    patch_t: int = Field(128, ge=1)
    """Frames per patch; a multiple of ``2**len(channels)``, equal in training and inference
    (the temporal position embedding is learned for exactly ``patch_t / 2**len(channels)``
    steps)."""

    @model_validator(mode="after")
    def _check(self) -> NetworkConfig:
        factor = 2 ** len(self.channels)
        if self.patch_t % factor:
            raise ValueError(
                f"--patch: patch_t {self.patch_t} is not a multiple of {factor} (the network "
                f"halves time {len(self.channels)} times); choose a multiple of {factor}"
            )
        if any(width < 1 for width in self.channels):
            raise ValueError("channels: every level needs at least one channel; fix channels")
        if self.embed_dim % self.heads:
            raise ValueError(
                f"heads: {self.heads} heads do not divide embed_dim {self.embed_dim}; "
                "change heads or embed_dim"
            )
        if self.shift >= self.window:
            raise ValueError(
                f"shift: shift {self.shift} must be smaller than window {self.window}; lower shift"
            )
        return self

    @property
    def time_factor(self) -> int:
        """How much the encoder shrinks time (``2**len(channels)``)."""
        return 2 ** len(self.channels)

    @classmethod
    def tiny(cls, patch_t: int = 16) -> NetworkConfig:
        """A very small network for tests: a forward and backward pass take milliseconds."""
        return cls(
            channels=(2, 2, 2, 2),
            embed_dim=8,
            heads=2,
            temporal_depth=1,
            spatial_depth=2,
            window=7,
            shift=3,
            mlp_ratio=2.0,
            patch_t=patch_t,
        )

    @classmethod
    def from_options(cls, **options: Any) -> NetworkConfig:
        """Validate options and raise :class:`ConfigError` (not pydantic's error) if bad."""
        try:
            return cls(**options)
        except ValidationError as exc:
            first = exc.errors()[0]
            subject = ".".join(str(part) for part in first["loc"]) or "network"
            message = first["msg"].removeprefix("Value error, ")
            if message.startswith("--") and ": " in message:  # the validator names the option
                subject, message = message.split(": ", 1)
            problem, _, fix = message.partition("; ")
            raise ConfigError(
                subject, problem, fix or "see NetworkConfig for the allowed values"
            ) from None


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
                "--patch",
                f"the network takes (batch, 1, {t}, y, x) input and got {tuple(x.shape)}",
                f"use patches of {t} frames (--patch {t},Y,X), the size the model was built for",
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
