"""Self-supervised training from a Zarr store: a plain torch loop with exact resume.

:func:`train` is the single-process entry (``srdvol train``). It validates the input and computes
the global statistics before anything is written, then runs :func:`run_loop`: draw a batch of
raw patches (:class:`srdvol.patches.PatchSampler`), let :class:`Trainer` take one optimiser step,
and every ``checkpoint_every`` steps write the training state next to the model
(``MODEL.state``: weights, Adam moments, step, learning-rate schedule, the pair and patch random
streams). ``resume=True`` continues from that file and ends with exactly the weights of an
uninterrupted run (on the CPU, for the same seed and options).

Defaults, and why (upstream uses Adam lr 1e-4, betas (0.5, 0.999), batch 1 per GPU, constant lr,
on raw mean-centred intensities): srdvol feeds ``(x - mean) / std``, so the input has unit scale
whatever the detector gain, and a larger learning rate is stable. The default is Adam lr 1e-3
with upstream's betas, a linear warm-up over the first 5 % of the steps, a cosine decay to 10 % at
the last step, the gradient norm clipped at 1, and batch 4. Measured on CPU with
``benchmarks/training_choices.py`` (benchmarks/RESULTS.md; simulated 0.3 Hz calcium, 64 frames of
64x64 at 2 photons/pixel, one seed: noisy 6.3 dB): a ~40 k-parameter network after 300 steps of
4 patches (16, 32, 32) reached 8.0 / 13.4 / 14.3 / 15.7 / 15.8 dB at lr 1e-4 / 3e-4 / 1e-3 /
3e-3 / 1e-2, the last through a loss spike of 4e7; the default 1.8 M network, 150 steps of
(16, 64, 64), reached 16.6 dB at 1e-3 with clipping and 15.8 dB without, and at 3e-3 16.7 dB with
clipping and -9.1 dB without (it never recovered). 1e-3 stays the default: past the warm-up its
loss stayed below 2, where 3e-3 spiked to 9e4 (default network, clipped) and 1e-2 to 4e7.

:func:`train` is :func:`prepare_training` (every check, the statistics, the resume state: a
:class:`TrainingPlan`) followed by :func:`run_training` (build, resume, loop, checkpoint, write);
:func:`srdvol.ddp.train_distributed` runs the same two steps, the first on the client and the
second on every rank, so both paths accept, refuse and write the same things.

Distributed training (``srdvol.ddp``) reuses this module. The simple route: on every rank, after
``torch.distributed.init_process_group``, call ``train(..., rank=r, world_size=n,
wrap=DistributedDataParallel)``; each rank samples its own patches, gradients are averaged in
``backward``, the ranks' random streams are gathered at each checkpoint, and only rank 0 writes
the state and the model (resume is exact across ranks too). For a custom loop the pieces are
public: ``Trainer(network, ..., rank=r, world_size=n, wrap=...)`` (the optimiser holds the bare
network, the forward pass goes through the wrapper), ``PatchSampler(..., rank=r, world_size=n)``
and :func:`run_loop` with an ``on_checkpoint`` that only rank 0 lets write.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from srdvol.errors import ConfigError, OutputExistsError, StoreNotFoundError
from srdvol.model.checkpoint import ModelRecord, Normalization, save_model, weights_checksum
from srdvol.model.network import NetworkConfig, build_network
from srdvol.normalize import Statistics, normalize, sample_statistics
from srdvol.patches import PatchSampler
from srdvol.storecheck import probe_writable

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LR",
    "DEFAULT_PATCH",
    "DEFAULT_STEPS",
    "Trainer",
    "TrainingPlan",
    "TrainingRun",
    "agree",
    "choose_sampling",
    "kept_text",
    "load_state",
    "lr_factor",
    "prepare_training",
    "resolve_device",
    "run_loop",
    "run_training",
    "state_path",
    "train",
]

log = logging.getLogger("srdvol.training")

#: Training patch (t, y, x) read from the store; the network trains on (t, y/2, x/2).
DEFAULT_PATCH = (64, 128, 128)
DEFAULT_STEPS = 2000
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 1e-3
#: Adam betas of upstream SRDTrans (a short memory of the first moment suits noisy targets).
BETAS = (0.5, 0.999)
WARMUP_FRACTION = 0.05
#: Global gradient-norm limit (a safety net for high learning rates; see the module docstring).
GRAD_CLIP = 1.0
FINAL_LR_FRACTION = 0.1
STATE_SUFFIX = ".state"


def state_path(model_path: str | os.PathLike[str]) -> Path:
    """Return the training-state file that sits next to ``model_path`` (``MODEL.state``)."""
    path = Path(model_path)
    return path.with_name(path.name + STATE_SUFFIX)


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` into CUDA when available, else CPU; pass other names through."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``steps``: warm-up, then cosine decay."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


class Trainer:
    """One optimiser step at a time on batches of raw patches; no file or store access.

    Parameters
    ----------
    network
        The bare SRDTrans network (moved to ``device`` here).
    stats
        Global statistics; batches are normalised with them.
    sampling
        ``"spatial"`` or ``"temporal"`` pairs.
    lr, steps
        Peak learning rate and the total number of steps of the schedule.
    seed
        Seeds the pair/augmentation stream (per rank).
    device
        Torch device.
    rank, world_size
        This process's place in a distributed run (1 process by default).
    wrap
        Called once with the network on its device; returns the module used for the forward
        pass (``DistributedDataParallel`` in :mod:`srdvol.ddp`). Default: no wrapper.
    grad_clip
        Clip the global gradient norm to this value (``None``: no clipping).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        stats: Statistics,
        sampling: str = "spatial",
        lr: float = DEFAULT_LR,
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        grad_clip: float | None = GRAD_CLIP,
    ) -> None:
        if sampling not in ("spatial", "temporal"):
            raise ConfigError("--sampling", f"{sampling!r} is not spatial or temporal", "pick one")
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.model = wrap(self.network) if wrap is not None else self.network
        self.stats = stats
        self.sampling = sampling
        self.steps = int(steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=lr, betas=BETAS)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps)
        )
        # Pair choices and augmentations come from a generator on the training device, seeded
        # per rank, so ranks draw different pairs and a run is reproducible.
        pair_seed = np.random.SeedSequence(seed, spawn_key=(rank, 1)).generate_state(1)[0]
        self.generator = torch.Generator(device=self.device).manual_seed(int(pair_seed))
        self.grad_clip = grad_clip
        self.last_grad_norm = math.nan
        self.step_count = 0

    def pairs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Turn a normalised batch ``(B, t, y, x)`` into (input, target, ...) tensors.

        Spatial sampling gives (input, target_a, target_b), each ``(B, t, y/2, x/2)``; temporal
        sampling reads ``2 t`` frames and gives (input, target), each ``(B, t, y, x)``.
        """
        from srdvol.sampling import random_dihedral, spatial_pairs, temporal_pairs

        batch = random_dihedral(batch, generator=self.generator)
        if self.sampling == "spatial":
            return spatial_pairs(batch, generator=self.generator)
        return temporal_pairs(batch, generator=self.generator)

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """The self-supervised loss of the current network on a batch of raw patches."""
        from srdvol.sampling import pair_loss, spatial_loss

        x = torch.from_numpy(normalize(batch, self.stats)).to(self.device)
        inputs, *targets = self.pairs(x)
        prediction = self.model(inputs[:, None])[:, 0]
        if len(targets) == 2:
            return spatial_loss(prediction, *targets)
        return pair_loss(prediction, targets[0])

    def step(self, batch: np.ndarray) -> float:
        """Take one optimiser step on raw patches ``(B, t, y, x)``; return the loss."""
        self.model.train()
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            # A rare huge gradient (a bright artefact in a patch) must not throw the weights off.
            norm = nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.last_grad_norm = float(norm)
        self.optimizer.step()
        self.schedule.step()
        self.step_count += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, random streams."""
        return {
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the schedule keeps this trainer's ``steps``)."""
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])


def run_loop(
    trainer: Trainer,
    sampler: PatchSampler,
    *,
    steps: int,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    progress: bool = False,
    losses: list[float] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[float]:
    """Train from ``trainer.step_count`` up to ``steps`` (or ``stop_after``) and return the losses.

    Parameters
    ----------
    trainer, sampler
        The optimiser state and this rank's patch source.
    steps
        Total number of steps of the run.
    checkpoint_every
        Call ``on_checkpoint(step)`` every this many steps, and always at the last step.
    on_checkpoint
        Writes the training state (set only on rank 0 in a distributed run).
    stop_after
        Stop (and checkpoint) once this many steps are done, even if ``steps`` is larger;
        a later resume then continues the same schedule.
    progress
        Show the progress of the steps (:func:`srdvol.progress.training`: a bar in a terminal,
        plain lines in a batch log).
    losses
        Loss history to extend in place (from a resumed state).
    on_step
        Called after every step with the step number and the mean loss of the recent steps.
    should_stop
        Asked before every step; when it answers True the loop checkpoints the steps done
        since the last checkpoint and returns early (a Ctrl-C, a distributed stop request).

    Returns
    -------
    list of float
        The loss of every step done so far, oldest first (``losses`` itself when given).
    """
    from srdvol import progress as progress_family

    history = losses if losses is not None else []
    end = steps if stop_after is None else min(steps, stop_after)
    every = max(1, int(checkpoint_every)) if checkpoint_every else 0
    report = max(1, steps // 20)
    saved_at = trainer.step_count
    per_step = int(getattr(sampler, "batch_size", 1) or 1) * trainer.world_size
    with progress_family.training(
        steps, done=trainer.step_count, samples_per_step=per_step, enabled=progress
    ) as bar:
        started, done = time.perf_counter(), 0
        while trainer.step_count < end:
            if should_stop is not None and should_stop():
                break
            loss = trainer.step(sampler.sample())
            if not math.isfinite(loss):
                lr = trainer.optimizer.param_groups[0]["lr"]
                raise ConfigError(
                    "--lr",
                    f"the training loss became {loss} at step {trainer.step_count} (lr {lr:.2g})",
                    "train again with a lower learning rate, for example a third of it",
                )
            history.append(loss)
            done += 1
            step = trainer.step_count
            recent = history[-report:]
            mean = sum(recent) / len(recent)
            bar.update(step, loss=mean)
            if on_step is not None:
                on_step(step, mean)
            if step % report == 0 or step == end:
                log.info(
                    "step %d/%d loss %.5f lr %.2e (%.2f s/step)",
                    step,
                    steps,
                    mean,
                    trainer.optimizer.param_groups[0]["lr"],
                    (time.perf_counter() - started) / done,
                )
            if on_checkpoint is not None and ((every and step % every == 0) or step == end):
                on_checkpoint(step)
                saved_at = step
                bar.milestone()
        if on_checkpoint is not None and trainer.step_count != saved_at:
            on_checkpoint(trainer.step_count)  # stopped early: keep every step done
            bar.milestone()
    return history


def _subject(image: xr.DataArray) -> str:
    return str(image.attrs.get("source") or image.name or "input array")


def _open(
    source: str | os.PathLike[str] | xr.DataArray,
    *,
    level: int,
    axes: str | None,
    channel: int | None,
) -> xr.DataArray:
    if isinstance(source, xr.DataArray):
        return source
    from srdvol.io import open_image

    return open_image(source, level=level, axes=axes, channel=channel)


def _check_patch(patch: tuple[int, int, int], sampling: str, config: NetworkConfig) -> None:
    if patch[0] != config.patch_t:
        raise ConfigError(
            "--patch",
            f"patch_t {patch[0]} differs from the network's patch_t {config.patch_t}",
            f"use --patch {config.patch_t},{patch[1]},{patch[2]} or a network built for "
            f"{patch[0]} frames",
        )
    if sampling != "temporal" and (patch[1] % 2 or patch[2] % 2):
        raise ConfigError(
            "--patch",
            f"spatial sampling splits frames into 2x2 cells, and patch {patch[1]}x{patch[2]} "
            "is odd",
            f"use an even patch size such as --patch {patch[0]},{patch[1] + patch[1] % 2},"
            f"{patch[2] + patch[2] % 2}",
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
    from srdvol.sampling import estimate_redundancy

    sampler = PatchSampler(image, patch=patch, seed=seed, batch_size=patches)
    estimate = estimate_redundancy(list(sampler.sample()), subject=_subject(image))
    return str(estimate.choice), estimate


def train(
    source: str | os.PathLike[str] | xr.DataArray,
    model_path: str | os.PathLike[str],
    *,
    patch: tuple[int, int, int] | None = None,
    sampling: str = "spatial",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    network: NetworkConfig | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "auto",
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
    stop_after: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> ModelRecord:
    """Train an SRDTrans model on a noisy image without clean data and write the model file.

    Parameters
    ----------
    source
        Path or URL of an OME-Zarr image (or plain Zarr array with ``axes``), or an opened
        :class:`xarray.DataArray` (as :func:`srdvol.io.open_image` returns).
    model_path
        Model file to write; the training state goes to ``model_path + ".state"``.
    patch
        Patch ``(t, y, x)`` of the model, as inference will use it (default
        :data:`DEFAULT_PATCH`); t a multiple of 16, y and x even for spatial sampling.
    sampling
        ``"spatial"`` (SRDTrans; any frame rate), ``"temporal"`` (interleaved frames; fast
        recordings) or ``"auto"`` (measure both redundancies, log them, pick).
    steps, batch_size, lr
        Optimiser steps, patches per step and peak learning rate (defaults
        :data:`DEFAULT_STEPS`, :data:`DEFAULT_BATCH_SIZE`, :data:`DEFAULT_LR`).
    seed
        Seeds the statistics sample, weights, patches, pairs and augmentation.
    network
        Network sizes; default ``NetworkConfig(patch_t=patch[0])``.
    checkpoint_every
        Write the training state every this many steps (and at the end).
    resume
        Continue from ``model_path + ".state"`` if it exists (same options required; ``steps``
        may be larger, which continues with the schedule of the new total).
    overwrite
        Replace an existing model file and state when not resuming.
    progress
        Show a progress bar with loss and ETA.
    device
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    level, axes, channel
        Passed to :func:`srdvol.io.open_image` when ``source`` is a path.
    stop_after
        Stop after this many steps in total (checkpointed, resumable), e.g. to fit a time slot.
    rank, world_size, wrap
        For distributed training (:mod:`srdvol.ddp`): call ``train`` on every rank after
        ``torch.distributed.init_process_group``, with ``wrap`` returning the
        ``DistributedDataParallel`` module. Every rank draws its own patches and pairs; at each
        checkpoint the ranks' random-stream states are gathered (``all_gather_object``) and only
        rank 0 writes the state and the model. Single process: leave the defaults.

    Returns
    -------
    ModelRecord
        What was written with the model (config, patch, sampling, normalisation, steps...).

    Raises
    ------
    DataError
        NaN/Inf or constant data in the statistics sample (raised before anything is written).
    ConfigError
        Inconsistent options (odd patch, patch_t not the network's, a resume with other options).
    OutputExistsError
        The model (or its state) exists and neither ``resume`` nor ``overwrite`` is set.
    """
    plan = prepare_training(
        source,
        model_path,
        patch=patch,
        sampling=sampling,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        network=network,
        resume=resume,
        overwrite=overwrite,
        level=level,
        axes=axes,
        channel=channel,
        rank=rank,
        world_size=world_size,
    )
    if plan.sampling_reason and progress and rank == 0:
        print(f"sampling auto: {plan.sampling_reason}")
    return run_training(
        plan,
        device=resolve_device(device),
        rank=rank,
        world_size=world_size,
        wrap=wrap,
        checkpoint_every=checkpoint_every,
        stop_after=stop_after,
        progress=progress and rank == 0,
    )


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a training loop needs, checked before anything is trained or written.

    :func:`prepare_training` makes it; :func:`run_training` runs it (on every rank of a
    distributed run). :meth:`portable` drops the opened image and the loaded state, so the plan
    is small enough to send to Dask workers, which re-open the image and re-read the state.

    Attributes
    ----------
    source, open_options
        The input as given and the :func:`srdvol.io.open_image` options (level, axes, channel).
    model_path, state_path
        The model file (absolute) and its training state ``MODEL.state``.
    config, patch, read
        Network sizes, the model's patch ``(t, y, x)`` and the patch read from the store.
    sampling
        ``"spatial"`` or ``"temporal"`` (``"auto"`` already resolved).
    sampling_reason
        Why ``"auto"`` chose ``sampling`` (``None`` when it was not measured in this call).
    steps, batch_size, lr, seed
        Total steps, patches per step and rank, peak learning rate, seed.
    stats
        Global statistics (the saved ones when resuming).
    options
        What must match on resume; stored in the training state.
    resume
        True when continuing from ``state_path``.
    saved, image
        The loaded training state and the opened image (``None`` in a portable plan).
    """

    source: Any
    open_options: dict[str, Any]
    model_path: Path
    state_path: Path
    config: NetworkConfig
    patch: tuple[int, int, int]
    read: tuple[int, int, int]
    sampling: str
    sampling_reason: str | None
    steps: int
    batch_size: int
    lr: float
    seed: int
    stats: Statistics
    options: dict[str, Any]
    resume: bool
    saved: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    image: xr.DataArray | None = field(default=None, repr=False, compare=False)

    def portable(self) -> TrainingPlan:
        """This plan without the opened image and the loaded state (both are re-read)."""
        return replace(self, saved=None, image=None)

    def open_image(self) -> xr.DataArray:
        """The input image: the one opened while planning, or opened again here."""
        if self.image is not None:
            return self.image
        return _open(self.source, **self.open_options)

    def saved_state(self) -> dict[str, Any] | None:
        """The training state to continue from (read again if dropped), or ``None``."""
        if not self.resume:
            return None
        return self.saved if self.saved is not None else load_state(self.state_path)


def prepare_training(
    source: str | os.PathLike[str] | xr.DataArray,
    model_path: str | os.PathLike[str],
    *,
    patch: tuple[int, int, int] | None = None,
    sampling: str = "spatial",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    network: NetworkConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    level: int = 0,
    axes: str | None = None,
    channel: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingPlan:
    """Check the options, the output and the data, and return the plan of a training run.

    Shared by :func:`train` and :func:`srdvol.ddp.train_distributed`, so both accept and refuse
    the same things. Options mean what they mean for :func:`train`; ``world_size`` is the number
    of ranks the plan is for (part of what a resume must match).

    Parameters
    ----------
    source, model_path, patch, sampling, steps, batch_size, lr, seed, network
        As for :func:`train`.
    resume, overwrite
        As for :func:`train`. A resume takes the saved statistics; ``sampling="auto"`` takes the
        saved sampling, any other option must equal the saved one.
    level, axes, channel
        Passed to :func:`srdvol.io.open_image` when ``source`` is a path.
    rank, world_size
        The caller's rank and the number of ranks. Only rank 0 writes: when starting afresh it
        deletes a stale ``MODEL.state`` (so a later resume never continues a replaced run).

    Returns
    -------
    TrainingPlan
        The checked options, statistics, and the loaded state when resuming.

    Raises
    ------
    ConfigError
        Inconsistent options (bad patch or sampling, a resume with other options).
    OutputExistsError
        The model or its state exists and neither ``resume`` nor ``overwrite`` is set.
    DataError
        NaN/Inf or constant data in the statistics sample.
    """
    if patch is None:
        patch = DEFAULT_PATCH if network is None else (network.patch_t, *DEFAULT_PATCH[1:])
    patch = tuple(int(v) for v in patch)  # type: ignore[assignment]
    steps = int(steps or DEFAULT_STEPS)
    batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
    lr = float(lr or DEFAULT_LR)
    if len(patch) != 3:
        raise ConfigError("--patch", f"{patch} is not three sizes", "pass T,Y,X")
    if sampling not in ("spatial", "temporal", "auto"):
        raise ConfigError("--sampling", f"{sampling!r} is unknown", "use spatial, temporal or auto")
    config = network or NetworkConfig.from_options(patch_t=patch[0])
    _check_patch(patch, "temporal" if sampling == "temporal" else "spatial", config)
    model_file = Path(model_path).absolute()
    state_file = state_path(model_file)
    saved = load_state(state_file) if resume and state_file.exists() else None
    if saved is None and not overwrite and (model_file.exists() or state_file.exists()):
        raise OutputExistsError(
            model_file,
            "a model (or its training state) already exists",
            "pass --resume to continue that training, --overwrite to replace it, or choose "
            "another model path",
        )
    probe_writable(model_file.parent, subject=model_file)  # not after hours of training

    open_options = {"level": level, "axes": axes, "channel": channel}
    image = _open(source, **open_options)  # type: ignore[arg-type]
    stats = sample_statistics(image, seed=seed)  # validates the data before anything is written
    reason = None
    if saved is not None and sampling == "auto":
        sampling = saved["options"]["sampling"]  # measured when the run started
    elif sampling == "auto":
        sampling, estimate = choose_sampling(image, patch=patch, seed=seed)
        reason = str(estimate.reason)
        log.info("sampling auto: %s", reason)
        _check_patch(patch, sampling, config)
    from srdvol.sampling import training_read_shape

    options = {
        "patch": list(patch),
        "sampling": sampling,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "world_size": world_size,
        "network": config.model_dump(mode="json"),
    }
    if saved is not None:
        _check_resume(saved["options"], options, state_file)
        stats = Statistics.from_dict(saved["stats"])
    elif rank == 0 and state_file.exists():
        state_file.unlink()  # --overwrite: never resume a replaced run's state later
    return TrainingPlan(
        source=source if not isinstance(source, str | os.PathLike) else os.fspath(source),
        open_options=open_options,
        model_path=model_file,
        state_path=state_file,
        config=config,
        patch=patch,  # type: ignore[arg-type]
        read=tuple(training_read_shape(patch, sampling=sampling)),  # type: ignore[arg-type]
        sampling=sampling,
        sampling_reason=reason,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        stats=stats,
        options=options,
        resume=saved is not None,
        saved=saved,
        image=image,
    )


class TrainingRun:
    """One rank's training in progress: network, optimiser, patch stream and loss history.

    Built from a :class:`TrainingPlan` (resuming from its saved state), advanced step by step
    with :meth:`advance` as often as needed, and ended with :meth:`finish`, which writes the model
    on rank 0. Distributed training keeps one alive in each worker process between the segment
    tasks that advance it; :func:`run_training` is the single-call form.

    Torch's global random stream and deterministic-kernel setting are this run's own while it
    runs (seeded from the plan, saved with the state) and the caller's in between, so other work
    in the same process between two calls does not change the result.

    Parameters
    ----------
    plan
        From :func:`prepare_training` (a :meth:`TrainingPlan.portable` copy is fine).
    device
        Torch device of this rank.
    rank, world_size, wrap
        As for :func:`train`.
    make_trainer
        Called with :class:`Trainer`'s arguments; a subclass may report progress.
    on_checkpoint
        Called on rank 0 with the state path and the step after each state is written.
    """

    def __init__(
        self,
        plan: TrainingPlan,
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        make_trainer: Callable[..., Trainer] = Trainer,
        on_checkpoint: Callable[[Path, int], None] | None = None,
    ) -> None:
        self.plan = plan
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.on_checkpoint = on_checkpoint
        self.image = plan.open_image()
        self._rng: torch.Tensor | None = None
        saved = plan.saved_state()
        #: Step of the latest training state on disk (None: none written or resumed yet).
        self.saved_step: int | None = None if saved is None else int(saved["trainer"]["step"])
        with self._own_streams():
            self.trainer = make_trainer(
                build_network(plan.config),
                stats=plan.stats,
                sampling=plan.sampling,
                lr=plan.lr,
                steps=plan.steps,
                seed=plan.seed,
                device=self.device,
                rank=rank,
                world_size=world_size,
                wrap=wrap,
            )
            self.sampler = PatchSampler(
                self.image,
                patch=plan.read,
                seed=plan.seed,
                rank=rank,
                world_size=world_size,
                batch_size=plan.batch_size,
            )
            self.losses: list[float] = []
            if saved is not None:
                self.trainer.load_state_dict(saved["trainer"])
                _load_streams(saved["ranks"][rank], self.trainer, self.sampler)
                self.losses = list(saved["losses"])
                if rank == 0:
                    log.info("resuming %s at step %d of %d", plan.model_path, self.step, plan.steps)

    @property
    def step(self) -> int:
        """Steps done so far (including those of a resumed run)."""
        return self.trainer.step_count

    @contextmanager
    def _own_streams(self) -> Any:
        """Torch's global RNG and deterministic kernels (CPU) of this run, the caller's after."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        caller = torch.get_rng_state()
        if self._rng is None:
            torch.manual_seed(self.plan.seed)
        else:
            torch.set_rng_state(self._rng)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(caller)
            torch.use_deterministic_algorithms(deterministic)

    def checkpoint(self, step: int | None = None) -> None:
        """Write the training state (a collective call: every rank must make it)."""
        streams = _gather(_streams(self.trainer, self.sampler), self.world_size)
        if self.rank != 0:
            return
        state = {
            "options": self.plan.options,
            "stats": self.plan.stats.to_dict(),
            "trainer": self.trainer.state_dict(),
            "sampler": streams[0]["sampler"],
            "ranks": streams,
            "losses": self.losses,
        }
        _save_state(self.plan.state_path, state)
        self.saved_step = self.step
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.plan.state_path, self.step if step is None else step)

    def advance(
        self,
        until: int,
        *,
        checkpoint_every: int | None = 100,
        progress: bool = False,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Train up to step ``until`` (checkpointing as :func:`run_loop` does); return the step
        reached, which is less than ``until`` when ``should_stop`` said so."""
        with self._own_streams():
            run_loop(
                self.trainer,
                self.sampler,
                steps=self.plan.steps,
                checkpoint_every=checkpoint_every,
                on_checkpoint=self.checkpoint,
                stop_after=until,
                progress=progress,
                losses=self.losses,
                on_step=on_step,
                should_stop=should_stop,
            )
        return self.step

    def finish(self) -> ModelRecord:
        """The model's record; rank 0 writes the model file."""
        record = _record(self.plan, self.image, self.trainer, self.losses)
        if self.rank == 0:
            _write_model(self.plan.model_path, self.trainer.network, record)
        return record

    def kept(self) -> str:
        """What an interrupted run leaves behind, in words."""
        return kept_text(self.saved_step, self.plan.steps, self.plan.state_path)


def kept_text(step: int | None, steps: int, path: str | os.PathLike[str]) -> str:
    """``"training state at step 3 of 8 saved to m.state"`` (or that none was saved)."""
    if step is None:
        return "no training step was saved yet"
    return f"training state at step {step} of {steps} saved to {os.fspath(path)}"


def agree(flag: bool, world_size: int, device: torch.device | str = "cpu") -> bool:
    """True on every rank when any rank says True (one small all-reduce; no-op for one rank)."""
    if world_size == 1:
        return bool(flag)
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def run_training(
    plan: TrainingPlan,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    progress: bool = False,
    make_trainer: Callable[..., Trainer] = Trainer,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    on_finish: Callable[[Trainer], None] | None = None,
) -> ModelRecord:
    """Run a :class:`TrainingPlan` on this rank: build, resume, train, checkpoint, write.

    SIGINT or SIGTERM (Ctrl-C) during the steps ends the current step, saves the training state
    and raises :class:`srdvol.interrupt.Interrupted` noting where the state is (every rank of a
    distributed group stops at the same step).

    Parameters
    ----------
    plan
        From :func:`prepare_training` (a :meth:`TrainingPlan.portable` copy is fine).
    device
        Torch device of this rank.
    rank, world_size, wrap
        As for :func:`train`.
    checkpoint_every, stop_after, progress
        As for :func:`train` (``progress`` is not restricted to rank 0 here).
    make_trainer
        Called with :class:`Trainer`'s arguments; a subclass may report progress.
    on_checkpoint
        Called on rank 0 with the state path and the step after each state is written.
    on_finish
        Called on every rank with the :class:`Trainer` once the loop ends, before the model is
        written (e.g. to compare the ranks' final weights).

    Returns
    -------
    ModelRecord
        The model's record (on every rank; only rank 0 writes the model file).
    """
    from srdvol import interrupt

    run = TrainingRun(
        plan,
        device=device,
        rank=rank,
        world_size=world_size,
        wrap=wrap,
        make_trainer=make_trainer,
        on_checkpoint=on_checkpoint,
    )
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)
    try:
        with interrupt.deferred():
            reached = run.advance(
                end,
                checkpoint_every=checkpoint_every,
                progress=progress,
                should_stop=lambda: agree(
                    interrupt.requested() is not None, world_size, run.device
                ),
            )
            if reached < end:
                raise interrupt.interruption()
    except KeyboardInterrupt as exc:  # stopped at a step, or a second Ctrl-C cut a step short
        interrupt.keep(exc, run.kept())
        raise
    if on_finish is not None:
        on_finish(run.trainer)
    return run.finish()


def _streams(trainer: Trainer, sampler: PatchSampler) -> dict[str, Any]:
    """This rank's random streams (the layout :mod:`srdvol.ddp` writes too)."""
    return {
        "trainer": {"generator": trainer.generator.get_state(), "torch_rng": torch.get_rng_state()},
        "sampler": sampler.state_dict(),
    }


def _load_streams(streams: dict[str, Any], trainer: Trainer, sampler: PatchSampler) -> None:
    sampler.load_state_dict(streams["sampler"])
    trainer.generator.set_state(streams["trainer"]["generator"])
    torch.set_rng_state(streams["trainer"]["torch_rng"])


def _gather(streams: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Collect every rank's streams (a collective call in a distributed run)."""
    if world_size == 1:
        return [streams]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, streams)
    return gathered


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a crash mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training state file (``MODEL.state``) onto the CPU.

    Raises
    ------
    StoreNotFoundError
        The file is truncated or not a training state.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file; say which and what to do
        raise StoreNotFoundError(
            path,
            f"the training state cannot be read ({type(exc).__name__})",
            "delete it and train without --resume, or pass --overwrite",
        ) from None
    return dict(state)


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key, value in current.items():
        if saved.get(key) != value:
            raise ConfigError(
                path,
                f"the saved training used {key}={saved.get(key)!r}, this run asks for {value!r}",
                f"resume with the same {key}, or pass --overwrite to start again",
            )


def _record(
    plan: TrainingPlan, image: xr.DataArray, trainer: Trainer, losses: list[float]
) -> ModelRecord:
    tail = losses[-max(1, len(losses) // 20) :] if losses else []
    data = {
        "source": str(image.attrs.get("source", image.name or "")),
        "dims": "".join(str(d) for d in image.dims),
        "shape": [int(n) for n in image.shape],
        "dtype": str(image.dtype),
        "level": None if image.attrs.get("level") is None else int(image.attrs["level"]),
        "statistics": plan.stats.to_dict(),
        "batch_size": plan.options["batch_size"],
        "lr": plan.options["lr"],
        "final_loss": sum(tail) / len(tail) if tail else None,
    }
    return ModelRecord(
        network=plan.config,
        patch=plan.patch,
        sampling=plan.sampling,  # type: ignore[arg-type]
        normalization=Normalization(mean=plan.stats.mean, std=plan.stats.std),
        training_data=data,
        steps=trainer.step_count,
        seed=plan.seed,
        weights_sha256=weights_checksum(trainer.network.state_dict()),  # as save_model writes
    )


def _write_model(path: Path, network: nn.Module, record: ModelRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, network, record)
