"""Run options: one validated object per run, passed down whole.

Every option of every command is declared here once, with its default and its limits:
:class:`ReadOptions` (which array of the input), :class:`TrainOptions`, :class:`PredictOptions`,
:class:`OutputOptions`, :class:`ClusterOptions` and :class:`SimulateOptions`, gathered in
:class:`RunOptions`. The command line and a ``--config`` file meet in :meth:`RunOptions.from_flat`,
which validates once; library functions receive the parts they need. Errors name the parameter
(``patch``), never a command-line flag: only :mod:`srdvol.app.cli` shows them as ``--patch``.

The value types (:class:`~srdvol.values.Patch`, overlap, GPU choice) and their checks live in
:mod:`srdvol.values` and are re-exported here. This module imports neither torch nor
distributed (``srdvol --help`` stays fast).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from srdvol.errors import ConfigError, flag
from srdvol.model.config import NetworkConfig
from srdvol.values import (
    DEFAULT_ANCHOR,
    DEFAULT_COMPRESSION,
    DEFAULT_OVERLAP,
    DEVICE_PREFIXES,
    FRAMES_PER_LEVEL,
    MAX_OVERLAP,
    Block,
    GPUChoice,
    Patch,
    Span,
    Window,
    check_model_patch_t,
    check_overlap,
    default_anchor,
    parse_compression,
    parse_gpus,
    parse_triple,
)

__all__ = [
    "DEFAULT_ANCHOR",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_COMPRESSION",
    "DEFAULT_DASHBOARD_ADDRESS",
    "DEFAULT_LR",
    "DEFAULT_OVERLAP",
    "DEFAULT_PHOTONS",
    "DEFAULT_STEPS",
    "DEFAULT_TRAIN_PATCH",
    "DEVICE_PREFIXES",
    "FRAMES_PER_LEVEL",
    "MAX_OVERLAP",
    "Autocast",
    "Block",
    "ClusterOptions",
    "GPUChoice",
    "Loss",
    "Ngff",
    "OutputDtype",
    "OutputOptions",
    "Patch",
    "PredictOptions",
    "ReadOptions",
    "RunOptions",
    "Sampling",
    "SimulateOptions",
    "TrainOptions",
    "Window",
    "check_model_patch_t",
    "check_overlap",
    "merge",
    "parse_gpus",
    "parse_triple",
    "refuse_unknown",
]

# ------------------------------------------------------------------------------ defaults, limits

#: Training patch (t, y, x) read from the store on a GPU; the network trains on (t, y/2, x/2).
DEFAULT_TRAIN_PATCH = (64, 128, 128)
DEFAULT_STEPS = 2000
DEFAULT_BATCH_SIZE = 4
#: Adam's peak learning rate (the training module's docstring says why 1e-3).
DEFAULT_LR = 1e-3
DEFAULT_CHECKPOINT_EVERY = 100
#: Default photon budget of a simulation: mean photons per pixel and frame at rest (noisy SNR
#: about 2 dB).
DEFAULT_PHOTONS = 1.0
#: Where a local cluster serves its dashboard unless the user asks for another address: this
#: machine only (reach it through an SSH tunnel, or pass another address such as 0.0.0.0:8787).
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"


class Sampling(enum.StrEnum):
    """How training pairs are drawn from noisy data."""

    spatial = "spatial"
    temporal = "temporal"
    auto = "auto"


class Loss(enum.StrEnum):
    """The self-supervised training loss between the prediction and its noisy targets."""

    mse = "mse"  # the conditional mean: unbiased under shot noise (benchmarks/RESULTS.md)
    l1mse = "l1mse"  # upstream SRDTrans: 0.5 L1 + 0.5 MSE (L1 pulls towards the median)


class OutputDtype(enum.StrEnum):
    """Data type of the denoised output."""

    float32 = "float32"
    input = "input"  # the input's dtype, rounded and clipped


class Ngff(enum.StrEnum):
    """NGFF version of the output: 0.5 on Zarr v3, 0.4 on Zarr v2 for older readers."""

    v05 = "0.5"
    v04 = "0.4"


class Autocast(enum.StrEnum):
    """bf16 autocast during prediction: auto (on for CUDA), on or off."""

    auto = "auto"
    on = "on"
    off = "off"


# ------------------------------------------------------------------------------ option groups

_ModelPatchField = Annotated[
    Patch, BeforeValidator(Patch.parse), AfterValidator(check_model_patch_t)
]
_ChunksField = Annotated[Patch, BeforeValidator(lambda v: Patch.parse(v, name="chunks"))]
_BlockField = Annotated[Patch, BeforeValidator(lambda v: Patch.parse(v, name="block"))]
_OverlapField = Annotated[float, AfterValidator(check_overlap)]


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``, validated like the original: the values it was given plus
        ``changes``, so a default that follows another option (``anchor`` with ``guide``)
        follows it again."""
        return type(self).create(**{**self.model_dump(exclude_unset=True), **changes})

    @classmethod
    def create(cls, **values: Any) -> Any:
        """Validate ``values``; a bad one raises :class:`ConfigError` naming its parameter."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _config_error(exc) from None


def merge(options: Any, cls: type[_Options], changes: dict[str, Any]) -> Any:
    """``options`` (or ``cls``'s defaults) updated with the entries of ``changes`` that are
    ``cls``'s fields; those entries are taken out of ``changes``.

    Library functions take an options object and keyword changes to it
    (``train(src, model, steps=10)``); this splits the changes among the groups.
    """
    mine = {key: changes.pop(key) for key in list(changes) if key in cls.model_fields}
    base = options if options is not None else cls()
    return base.replace(**mine) if mine else base


def refuse_unknown(changes: Mapping[str, Any], what: str) -> None:
    """Raise a :class:`ConfigError` naming the first of ``changes`` (left over by :func:`merge`)."""
    if changes:
        name = next(iter(changes))
        raise ConfigError(flag(name), f"is not {what}", _KNOWN_FIX)


def _span(axis: str) -> Any:
    return Annotated[Span | None, BeforeValidator(lambda v: _parse_span(v, axis))]


def _parse_span(value: Any, axis: str) -> Span | None:
    return None if value is None else Span.parse(value, name=axis)


class ReadOptions(_Options):
    """Which array of the input is read, and which part of it."""

    level: int = Field(0, ge=0, description="Multiscale level to read (0: full resolution).")
    channel: int | None = Field(None, ge=0, description="Only this channel (default: all).")
    axes: str | None = Field(None, description="Axes of a plain Zarr array, e.g. tzyx.")
    allow_missing_chunks: bool = Field(
        False, description="Read chunks missing from the input as the fill value (a warning)."
    )
    t: _span("t") = Field(None, description="Only frames START:STOP (STOP excluded).")
    z: _span("z") = Field(None, description="Only z planes START:STOP, or one plane.")
    c: _span("c") = Field(None, description="Only channels START:STOP, or one channel.")
    y: _span("y") = Field(None, description="Only rows START:STOP (a crop).")
    x: _span("x") = Field(None, description="Only columns START:STOP (a crop).")

    @model_validator(mode="after")
    def _one_channel_option(self) -> ReadOptions:
        if self.channel is not None and self.c is not None:
            raise ConfigError(
                flag("c"), f"given together with {flag('channel')}", "give only one of them"
            )
        return self

    def selection(self) -> dict[str, Span]:
        """The part of the input to read, by axis (``channel`` is ``c`` of one index)."""
        spans = {a: getattr(self, a) for a in ("t", "c", "z", "y", "x") if getattr(self, a)}
        if self.channel is not None:
            spans["c"] = Span(self.channel, self.channel + 1)
        return spans

    def open_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`srdvol.ngff.read.open_image`."""
        return {"level": self.level, "axes": self.axes, "select": self.selection()}


class TrainOptions(_Options):
    """Self-supervised training."""

    patch: _ModelPatchField | None = Field(
        None,
        description="Training patch T,Y,X (T a multiple of 16); default 64,128,128, or the "
        "saved one when resuming.",
    )
    sampling: Sampling = Field(Sampling.spatial, description="Training pairs.")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="Optimiser steps.")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Patches per step and worker.")
    lr: float = Field(DEFAULT_LR, gt=0, allow_inf_nan=False, description="Peak learning rate.")
    loss: Loss = Field(
        Loss.mse, description="Training loss: mse, or l1mse (upstream's 0.5 L1 + 0.5 MSE)."
    )
    seed: int = Field(0, description="Seeds statistics sample, weights, patches and pairs.")
    checkpoint_every: int = Field(
        DEFAULT_CHECKPOINT_EVERY, ge=1, description="Steps between saved training states."
    )
    resume: bool = Field(False, description="Continue an interrupted training.")
    overwrite: bool = Field(False, description="Replace an existing model and its state.")
    network: NetworkConfig | None = Field(
        None, description="Network sizes; default: the standard network for the patch's t."
    )
    device: str = Field("auto", description="Torch device: auto (CUDA if present), cpu, cuda:1.")
    stop_after: int | None = Field(
        None,
        ge=1,
        description="Stop once this many steps are done (saved, resumable), e.g. to fit a job's "
        "time limit.",
    )

    def patch_or_default(self, patch_t: int | None = None) -> Patch:
        """The patch to train on: the given one, else the default (with ``patch_t``)."""
        if self.patch is not None:
            return self.patch
        t = patch_t if patch_t is not None else DEFAULT_TRAIN_PATCH[0]
        return Patch(t, *DEFAULT_TRAIN_PATCH[1:])


class PredictOptions(_Options):
    """Prediction: the patch lattice, blocks and blending."""

    patch: _ModelPatchField | None = Field(None, description="Patch T,Y,X; default: the model's.")
    overlap: _OverlapField = Field(DEFAULT_OVERLAP, description="Patch overlap fraction.")
    block: _BlockField | None = Field(
        None, description="Processing block T,Y,X; default from the chunks and worker memory."
    )
    window: Window = Field(Window.TENT, description="Blending window of overlapping patches.")
    autocast: Autocast = Field(Autocast.auto, description="bf16 autocast: auto, on or off.")
    tta: bool = Field(
        False,
        description="Test-time augmentation: average the model over the 8 symmetries of the "
        "(y, x) plane (8x the prediction time).",
    )
    anchor: float = Field(
        None,  # type: ignore[assignment]  # filled in from guide by _anchor_for_guide
        ge=0,
        allow_inf_nan=False,
        description="Keep the input's intensities at scales above this Gaussian sigma in "
        f"pixels (the network's fine detail, the measurement's coarse levels); default "
        f"{DEFAULT_ANCHOR:g}, {default_anchor(1):g} with guide; 0 turns it off.",
    )
    guide: int = Field(
        0,
        ge=0,
        le=16,
        description="Filter each denoised frame's activity with the input's mean image as "
        "guide, in windows of this radius in pixels (a still recording); 0 turns it off.",
    )
    restore: int = Field(
        0,
        ge=0,
        le=16,
        description="Put back the transient amplitudes the network flattens: in every "
        "44-pixel tile, this many activity patterns of the denoised stretch of 256 frames "
        "fitted to the input (a still recording; includes guide and replaces anchor); 0 turns "
        "it off.",
    )
    renormalize: bool = Field(
        False,
        description="Normalise the input with its own sampled mean and std, not the model's "
        "training statistics.",
    )

    @model_validator(mode="after")
    def _anchor_for_guide(self) -> PredictOptions:
        # The anchor's default depends on the guide (its correction is shaped when guided).
        # Set past the frozen check and left out of model_fields_set: still a default, so
        # replace(guide=...) derives it again.
        if self.restore and (self.guide or self.anchor):
            raise ConfigError(
                flag("restore"),
                f"it replaces {flag('guide' if self.guide else 'anchor')} (it filters the "
                "activity with the mean image itself and puts the amplitudes back)",
                f"leave out {flag('guide' if self.guide else 'anchor')}, or {flag('restore')}",
            )
        if self.anchor is None:
            object.__setattr__(self, "anchor", default_anchor(self.guide, self.restore))
        return self


class OutputOptions(_Options):
    """What is written."""

    dtype: OutputDtype = Field(OutputDtype.float32, description="float32, or the input's dtype.")
    ngff: Ngff = Field(Ngff.v05, description="NGFF version: 0.5 (Zarr v3) or 0.4 (Zarr v2).")
    chunks: _ChunksField | None = Field(
        None,
        description="Output chunks T,Y,X (c and z chunks are one plane); default: up to 16 "
        "frames within 4 MiB, planes up to 512 x 512.",
    )
    compression: Annotated[int, BeforeValidator(parse_compression)] = Field(
        DEFAULT_COMPRESSION, description="blosc-zstd level 1-9, or none (0)."
    )
    overwrite: bool = Field(False, description="Replace an output of another run.")

    def chunk_map(self) -> dict[str, int] | None:
        """The chunks by axis name, as :func:`srdvol.ngff.write.create_output` takes them."""
        return None if self.chunks is None else self.chunks.as_dict()


class ClusterOptions(_Options):
    """Where the work runs: an existing scheduler, or a local cluster."""

    scheduler: str | None = Field(None, description="Address of a running Dask scheduler.")
    workers: int | None = Field(None, ge=1, description="Local CPU worker processes.")
    gpus: Annotated[Any, BeforeValidator(parse_gpus)] = Field(
        None,
        description="GPUs: auto, all, none, positions among the visible GPUs (0,1) or ids "
        "(GPU-<uuid>).",
    )
    dashboard_address: str | None = Field(
        DEFAULT_DASHBOARD_ADDRESS, description="Dashboard address (None: no dashboard)."
    )
    threads_per_worker: int | None = Field(None, ge=1, description="Threads of a CPU worker.")

    def local_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`srdvol.dask.cluster.open_cluster`."""
        return self.model_dump()


class SimulateOptions(_Options):
    """Synthetic calcium imaging (``srdvol simulate``)."""

    frames: int = Field(128, ge=FRAMES_PER_LEVEL, description="Frames (time points).")
    planes: int | None = Field(None, ge=1, description="z planes (none: a T,Y,X movie).")
    size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        (128, 128), description="Frame size Y,X."
    )
    rate_hz: float = Field(0.3, gt=0, allow_inf_nan=False, description="Volume rate in Hz.")
    photons: float = Field(
        DEFAULT_PHOTONS,
        gt=0,
        allow_inf_nan=False,
        description="Mean photons per pixel and frame at rest (lower: noisier).",
    )
    seed: int = Field(0, description="Random seed.")
    pixel_size_um: float = Field(1.0, gt=0, allow_inf_nan=False, description="Pixel size (µm).")
    overwrite: bool = Field(False, description="Replace existing stores.")


class RunOptions(_Options):
    """Every option of a run, in groups; built once where the command line and ``--config``
    meet (:meth:`from_flat`) and passed down whole."""

    read: ReadOptions = ReadOptions()
    train: TrainOptions = TrainOptions()
    predict: PredictOptions = PredictOptions()
    output: OutputOptions = OutputOptions()
    cluster: ClusterOptions = ClusterOptions()

    @classmethod
    def flat_names(cls) -> dict[str, tuple[str, ...]]:
        """Every flat option name and the groups it sets (``patch``: train and predict)."""
        return dict(_FLAT)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, overwrite: str = "output") -> RunOptions:
        """Build from flat option names (``patch``, ``steps``, ``level`` ...), as the command
        line and configuration files write them; ``None`` values keep the default.

        ``patch`` sets both the training and the prediction patch (they are one size);
        ``seed`` is training's; ``overwrite`` goes to the group ``overwrite`` names ("output",
        or "train" for ``srdvol train``, where it replaces the model).

        Raises
        ------
        ConfigError
            For an unknown name or a bad value, naming it.
        """
        groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
        for key, value in values.items():
            if value is None:
                continue
            targets = _FLAT.get(key)
            if targets is None:
                raise ConfigError(flag(key), "is not an option of this command", _KNOWN_FIX)
            if key == "overwrite":
                targets = (overwrite,)
            for group in targets:
                groups[group][key] = value
        return cls.create(**{name: _GROUPS[name].create(**v) for name, v in groups.items()})


_GROUPS: dict[str, type[_Options]] = {
    "read": ReadOptions,
    "train": TrainOptions,
    "predict": PredictOptions,
    "output": OutputOptions,
    "cluster": ClusterOptions,
}


def _flat_names() -> dict[str, tuple[str, ...]]:
    names: dict[str, tuple[str, ...]] = {}
    for group, model in _GROUPS.items():
        for field in model.model_fields:
            names[field] = (*names.get(field, ()), group)
    return names


#: Flat option name -> the groups it sets.
_FLAT = _flat_names()
_KNOWN_FIX = "see srdvol COMMAND --help for the options"


def _config_error(exc: ValidationError) -> ConfigError:
    """One sentence naming the first bad parameter (ConfigErrors raised by validators keep
    their own words)."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    name = next((str(p) for p in reversed(first["loc"]) if isinstance(p, str)), "option")
    given = first.get("input")
    problem = first["msg"][0].lower() + first["msg"][1:]
    if first["type"] == "extra_forbidden":
        return ConfigError(flag(name), "is not an option", _KNOWN_FIX)
    return ConfigError(flag(name), f"{given!r}: {problem}", "give a valid value")
