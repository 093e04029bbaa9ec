"""Sizes of the SRDTrans network, stored with every model; imports pydantic only (no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from srdvol.errors import ConfigError, ModelMismatchError, flag

__all__ = ["NetworkConfig"]


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
                f"{flag('patch')}: patch_t {self.patch_t} is not a multiple of {factor} (the "
                f"network halves time {len(self.channels)} times); choose a multiple of {factor}"
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
            if message.startswith("[[") and ": " in message:  # the validator names the option
                subject, message = message.split(": ", 1)
            problem, _, fix = message.partition("; ")
            raise ConfigError(
                subject, problem, fix or "see NetworkConfig for the allowed values"
            ) from None

    def check_patch(
        self,
        patch: Sequence[int],
        *,
        subject: str | None = None,
        trained: Sequence[int] | None = None,
    ) -> None:
        """The one check that a patch fits this network: its t must be ``patch_t``.

        Only the number of frames is binding (the temporal position embedding is learned for
        exactly ``patch_t`` frames); the network accepts any y and x.

        Parameters
        ----------
        patch
            ``(t, y, x)``.
        subject
            The model file, when the network is a trained model's (default: the option).
        trained
            The patch the model was trained with, for the message.

        Raises
        ------
        ModelMismatchError
            If ``patch[0]`` is not a trained model's ``patch_t``.
        ConfigError
            If ``patch[0]`` is not the ``patch_t`` of a network being configured.
        """
        t, y, x = (int(v) for v in patch)
        if t == self.patch_t:
            return
        if trained is not None:
            text = ",".join(str(v) for v in trained)
            problem = (
                f"was trained with patch {text} ({self.patch_t} frames) and {t} frames were "
                "requested"
            )
            fix = (
                f"run with {flag('patch')} {text} (any y, x with {self.patch_t} frames) or retrain"
            )
        else:
            problem = f"patch_t {t} differs from the network's patch_t {self.patch_t}"
            fix = f"use {self.patch_t},{y},{x}, or a network built for {t} frames"
        if trained is None:  # two options that disagree
            raise ConfigError(subject if subject is not None else flag("patch"), problem, fix)
        raise ModelMismatchError(subject if subject is not None else "model", problem, fix)
