"""Planning a training run: every check, the statistics and the resume state, before anything
is trained or written (:func:`prepare_training` makes a :class:`TrainingPlan`).

Shared by single-process training (:func:`srdvol.training.loop.train`) and distributed training
(:func:`srdvol.dask.ddp_train.train_distributed`), so both accept and refuse the same things.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import xarray as xr

from srdvol.core.normalize import Statistics, sample_statistics
from srdvol.errors import ConfigError, OutputExistsError, flag
from srdvol.model.config import NetworkConfig
from srdvol.ngff.storecheck import probe_writable
from srdvol.options import Patch, ReadOptions, Sampling, TrainOptions
from srdvol.training.patches import PatchSampler
from srdvol.training.state import check_resume, load_state, state_path

__all__ = ["TrainingPlan", "choose_sampling", "open_source", "prepare_training"]

log = logging.getLogger("srdvol.training")


def open_source(source: str | os.PathLike[str] | xr.DataArray, read: ReadOptions) -> xr.DataArray:
    """The input image: ``source`` itself when it is already opened, else opened with ``read``."""
    if isinstance(source, xr.DataArray):
        return source
    from srdvol.ngff.read import open_image

    return open_image(source, **read.open_options())


def _subject(image: xr.DataArray) -> str:
    return str(image.attrs.get("source") or image.name or "input array")


def _check_even(patch: Patch, sampling: str) -> None:
    """Spatial sampling splits frames into 2x2 cells: y and x must be even."""
    if sampling != Sampling.temporal and (patch.y % 2 or patch.x % 2):
        raise ConfigError(
            flag("patch"),
            f"spatial sampling splits frames into 2x2 cells, and patch {patch.y}x{patch.x} is odd",
            f"use an even size such as {patch.t},{patch.y + patch.y % 2},{patch.x + patch.x % 2}",
        )


def choose_sampling(
    image: xr.DataArray, *, patch: tuple[int, int, int], seed: int = 0, patches: int = 8
) -> tuple[str, Any]:
    """Measure spatial and temporal redundancy on a few patches and pick the sampler.

    Returns
    -------
    (str, RedundancyEstimate)
        ``"spatial"`` or ``"temporal"`` and the estimate it was chosen from (``.spatial``,
        ``.temporal`` and ``.reason``).
    """
    from srdvol.training.pairs import estimate_redundancy

    sampler = PatchSampler(image, patch=patch, seed=seed, batch_size=patches)
    estimate = estimate_redundancy(list(sampler.sample()), subject=_subject(image))
    return str(estimate.choice), estimate


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a training loop needs, checked before anything is trained or written.

    :func:`prepare_training` makes it; :func:`srdvol.training.loop.run_training` runs it (on
    every rank of a distributed run). :meth:`portable` drops the opened image and the loaded
    state, so the plan is small enough to send to Dask workers, which re-open the image and
    re-read the state.

    Attributes
    ----------
    source, read
        The input as given and which array of it is read.
    model_path, state_path
        The model file (absolute) and its training state ``MODEL.state``.
    config, patch, read_shape
        Network sizes, the model's patch ``(t, y, x)`` and the patch read from the store.
    options
        The training options, resolved: patch set, ``sampling`` measured if it was ``auto``.
    sampling_reason
        Why ``auto`` chose the sampling (``None`` when it was not measured in this call).
    stats
        Global statistics (the saved ones when resuming).
    must_match
        What a resume must match; stored in the training state.
    resume
        True when continuing from ``state_path``.
    saved, image
        The loaded training state and the opened image (``None`` in a portable plan).
    """

    source: Any
    read: ReadOptions
    model_path: Path
    state_path: Path
    config: NetworkConfig
    patch: Patch
    read_shape: tuple[int, int, int]
    options: TrainOptions
    sampling_reason: str | None
    stats: Statistics
    must_match: dict[str, Any]
    resume: bool
    saved: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    image: xr.DataArray | None = field(default=None, repr=False, compare=False)

    @property
    def steps(self) -> int:
        """Total steps of the run."""
        return self.options.steps

    @property
    def batch_size(self) -> int:
        """Patches per step and rank."""
        return self.options.batch_size

    @property
    def sampling(self) -> str:
        """``"spatial"`` or ``"temporal"``."""
        return str(self.options.sampling.value)

    def portable(self) -> TrainingPlan:
        """This plan without the opened image and the loaded state (both are re-read)."""
        return replace(self, saved=None, image=None)

    def open_image(self) -> xr.DataArray:
        """The input image: the one opened while planning, or opened again here."""
        if self.image is not None:
            return self.image
        return open_source(self.source, self.read)

    def saved_state(self) -> dict[str, Any] | None:
        """The training state to continue from (read again if dropped), or ``None``."""
        if not self.resume:
            return None
        return self.saved if self.saved is not None else load_state(self.state_path)


def prepare_training(
    source: str | os.PathLike[str] | xr.DataArray,
    model_path: str | os.PathLike[str],
    options: TrainOptions,
    *,
    read: ReadOptions | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingPlan:
    """Check the options, the output and the data, and return the plan of a training run.

    Parameters
    ----------
    source, model_path
        As for :func:`srdvol.training.loop.train`.
    options
        Training options. A resume takes the saved statistics; ``sampling="auto"`` takes the
        saved sampling, and the other options that shape the run must equal the saved ones.
    read
        Which array of ``source`` to read (when it is a path).
    rank, world_size
        The caller's rank and the number of ranks (part of what a resume must match). Only rank
        0 writes: when starting afresh it deletes a stale ``MODEL.state`` (so a later resume
        never continues a replaced run).

    Returns
    -------
    TrainingPlan
        The checked options, statistics, and the loaded state when resuming.

    Raises
    ------
    ConfigError
        Inconsistent options (odd patch for spatial sampling, a resume with other options).
        A network built for another patch_t than the patch's.
    OutputExistsError
        The model or its state exists and neither ``resume`` nor ``overwrite`` is set.
    DataError
        NaN/Inf or constant data in the statistics sample.
    """
    read = read or ReadOptions()
    network = options.network
    patch = options.patch_or_default(None if network is None else network.patch_t)
    config = network or NetworkConfig.from_options(patch_t=patch.t)
    config.check_patch(patch)
    _check_even(patch, options.sampling)
    model_file = Path(model_path).absolute()
    state_file = state_path(model_file)
    saved = load_state(state_file) if options.resume and state_file.exists() else None
    if saved is None and not options.overwrite and (model_file.exists() or state_file.exists()):
        raise OutputExistsError(
            model_file,
            "a model (or its training state) already exists",
            f"pass {flag('resume')} to continue that training, {flag('overwrite')} to replace "
            "it, or choose another model path",
        )
    probe_writable(model_file.parent, subject=model_file)  # not after hours of training

    image = open_source(source, read)
    stats = sample_statistics(image, seed=options.seed)  # validates the data before any write
    sampling, reason = options.sampling, None
    if saved is not None and sampling == Sampling.auto:
        sampling = Sampling(saved["options"]["sampling"])  # measured when the run started
    elif sampling == Sampling.auto:
        chosen, estimate = choose_sampling(image, patch=patch, seed=options.seed)
        sampling, reason = Sampling(chosen), str(estimate.reason)
        log.info("sampling auto: %s", reason)
        _check_even(patch, sampling)
    from srdvol.training.pairs import training_read_shape

    resolved = options.replace(patch=patch, sampling=sampling, network=config)
    must_match = {
        "patch": list(patch),
        "sampling": sampling.value,
        "batch_size": options.batch_size,
        "lr": options.lr,
        "loss": options.loss.value,
        "seed": options.seed,
        "world_size": world_size,
        "network": config.model_dump(mode="json"),
    }
    if saved is not None:
        check_resume(saved["options"], must_match, state_file)
        stats = Statistics.from_dict(saved["stats"])
    elif rank == 0 and state_file.exists():
        state_file.unlink()  # overwrite: never resume a replaced run's state later
    return TrainingPlan(
        source=source if not isinstance(source, str | os.PathLike) else os.fspath(source),
        read=read,
        model_path=model_file,
        state_path=state_file,
        config=config,
        patch=patch,
        read_shape=tuple(training_read_shape(patch, sampling=sampling.value)),  # type: ignore[arg-type]
        options=resolved,
        sampling_reason=reason,
        stats=stats,
        must_match=must_match,
        resume=saved is not None,
        saved=saved,
        image=image,
    )
