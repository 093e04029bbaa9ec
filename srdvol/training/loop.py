"""Self-supervised training from a Zarr store: a plain torch loop with exact resume.

:func:`train` is the single-process entry (``srdvol train``): :func:`prepare_training` (every
check, the statistics, the resume state: a :class:`~srdvol.training.plan.TrainingPlan`), then
:func:`run_training` (build, resume, loop, checkpoint, write). Distributed training
(:mod:`srdvol.dask.ddp_train`) runs the same two steps, the first on the client and the second on
every rank, so both paths accept, refuse and write the same things.

The loop (:func:`run_loop`) draws a batch of raw patches
(:class:`~srdvol.training.patches.PatchSampler`), lets
:class:`~srdvol.training.trainer.Trainer` take one optimiser step, and every
``checkpoint_every`` steps writes the training state next to the model (``MODEL.state``).
``resume`` continues from that file and ends with exactly the weights of an uninterrupted run
(on the CPU, for the same seed and options).

For a loop under your own ``torch.distributed`` launcher, call
``run_training(prepare_training(..., rank=r, world_size=n), place=Rank(r, n,
DistributedDataParallel))`` on every rank after ``init_process_group``: each rank samples its
own patches, gradients are averaged in ``backward``, the ranks' random streams are gathered
at each checkpoint, and only rank 0 writes the state and the model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from srdvol.errors import ConfigError, flag
from srdvol.model.checkpoint import ModelRecord
from srdvol.model.device import resolve_device
from srdvol.model.network import build_network
from srdvol.options import ReadOptions, TrainOptions, merge, refuse_unknown
from srdvol.training.collective import agree, gather_objects
from srdvol.training.patches import PatchSampler
from srdvol.training.plan import TrainingPlan, prepare_training
from srdvol.training.state import (
    kept_text,
    load_streams,
    model_record,
    save_state,
    streams,
    write_model,
)
from srdvol.training.trainer import SINGLE_PROCESS, Rank, Trainer

__all__ = ["CHECKPOINT_SECONDS", "LoopHooks", "TrainingRun", "run_loop", "run_training", "train"]

log = logging.getLogger("srdvol.training")

#: A single-process training also writes its state when the last one is this many seconds old,
#: whatever ``checkpoint_every`` says: on a CPU a step can take a minute, and a batch system's
#: SIGKILL (SLURM sends it 30 s after SIGTERM by default) would lose every step since the last
#: state. Ten minutes bound that loss, for a write that costs little beside them.
CHECKPOINT_SECONDS = 600.0


def train(
    source: str | os.PathLike[str] | xr.DataArray,
    model_path: str | os.PathLike[str],
    options: TrainOptions | None = None,
    *,
    read: ReadOptions | None = None,
    progress: bool = True,
    **changes: Any,
) -> ModelRecord:
    """Train an SRDTrans model on a noisy image without clean data and write the model file.

    Parameters
    ----------
    source
        Path or URL of an OME-Zarr image (or plain Zarr array with ``axes``), or an opened
        :class:`xarray.DataArray` (as :func:`srdvol.open` returns it).
    model_path
        Model file to write; the training state goes to ``model_path + ".state"``.
    options
        :class:`~srdvol.options.TrainOptions` (patch, sampling, steps, batch size, lr, seed,
        network, checkpoint interval, resume/overwrite, device, stop_after); defaults if
        omitted.
    read
        :class:`~srdvol.options.ReadOptions`: which array of ``source`` (level, axes, channel).
    progress
        Show the steps' progress (loss, samples/s, ETA): a bar in a terminal, plain lines in a
        batch log.
    **changes
        Changes to ``options`` or ``read`` by field name, e.g. ``steps=200, axes="tyx"``.

    Returns
    -------
    ModelRecord
        What was written with the model (config, patch, sampling, normalisation, steps...).

    Raises
    ------
    DataError
        NaN/Inf or constant data in the statistics sample (raised before anything is written).
    ConfigError
        Inconsistent options (odd patch, a resume with other options), naming the option.
    ModelMismatchError
        A network built for another patch_t.
    OutputExistsError
        The model (or its state) exists and neither ``resume`` nor ``overwrite`` is set.
    """
    read = merge(read, ReadOptions, changes)
    options = merge(options, TrainOptions, changes)
    refuse_unknown(changes, "a training option")
    plan = prepare_training(source, model_path, options, read=read)
    if plan.sampling_reason and progress:
        print(f"sampling auto: {plan.sampling_reason}")
    return run_training(plan, device=resolve_device(options.device), progress=progress)


@dataclass(frozen=True)
class LoopHooks:
    """What :func:`run_loop` calls besides the optimiser.

    Attributes
    ----------
    on_checkpoint
        Called with the step to write the training state (set only on rank 0 of a distributed
        run), every ``checkpoint_every`` steps, at the last step and when the loop stops early.
    on_step
        Called after every step with the step number and the mean loss of the recent steps.
    should_stop
        Asked before every step; when it answers True the loop checkpoints the steps done
        since the last checkpoint and returns early (a Ctrl-C, a distributed stop request).
    checkpoint_due
        Asked after every step; True makes the loop checkpoint then too (the saved state has
        grown old: :data:`CHECKPOINT_SECONDS`).
    """

    on_checkpoint: Callable[[int], None] | None = None
    on_step: Callable[[int, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint_due: Callable[[], bool] | None = None


_NO_HOOKS = LoopHooks()


def run_loop(
    trainer: Trainer,
    sampler: PatchSampler,
    *,
    steps: int,
    until: int | None = None,
    checkpoint_every: int | None = None,
    hooks: LoopHooks = _NO_HOOKS,
    progress: bool = False,
    losses: list[float] | None = None,
) -> list[float]:
    """Train from ``trainer.step_count`` up to ``steps`` (or ``until``) and return the losses.

    Parameters
    ----------
    trainer, sampler
        The optimiser state and this rank's patch source.
    steps
        Total number of steps of the run (the schedule's length).
    until
        Stop (and checkpoint) once this many steps are done, even if ``steps`` is larger;
        a later resume then continues the same schedule.
    checkpoint_every
        Call ``hooks.on_checkpoint(step)`` every this many steps, and always at the last step.
    hooks
        Checkpoint, per-step report and stop request (:class:`LoopHooks`).
    progress
        Show the progress of the steps (:func:`srdvol.progress.training`: a bar in a terminal,
        plain lines in a batch log).
    losses
        Loss history to extend in place (from a resumed state).

    Returns
    -------
    list of float
        The loss of every step done so far, oldest first (``losses`` itself when given).
    """
    from srdvol import progress as progress_family

    history = losses if losses is not None else []
    end = steps if until is None else min(steps, until)
    every = max(1, int(checkpoint_every)) if checkpoint_every else 0
    report = max(1, steps // 20)
    saved_at = trainer.step_count
    per_step = int(getattr(sampler, "batch_size", 1) or 1) * trainer.world_size
    with progress_family.training(
        steps, done=trainer.step_count, samples_per_step=per_step, enabled=progress
    ) as bar:
        started, done = time.perf_counter(), 0
        while trainer.step_count < end:
            if hooks.should_stop is not None and hooks.should_stop():
                break
            loss = trainer.step(sampler.sample())
            if not math.isfinite(loss):
                lr = trainer.optimizer.param_groups[0]["lr"]
                raise ConfigError(
                    flag("lr"),
                    f"the training loss became {loss} at step {trainer.step_count} (lr {lr:.2g})",
                    "train again with a lower learning rate, for example a third of it",
                )
            history.append(loss)
            done += 1
            step = trainer.step_count
            recent = history[-report:]
            mean = sum(recent) / len(recent)
            bar.update(step, loss=mean)
            if hooks.on_step is not None:
                hooks.on_step(step, mean)
            if step % report == 0 or step == end:
                log.info(
                    "step %d/%d loss %.5f lr %.2e (%.2f s/step)",
                    step,
                    steps,
                    mean,
                    trainer.optimizer.param_groups[0]["lr"],
                    (time.perf_counter() - started) / done,
                )
            due = (every and step % every == 0) or step == end
            if hooks.on_checkpoint is not None and (
                due or (hooks.checkpoint_due is not None and hooks.checkpoint_due())
            ):
                hooks.on_checkpoint(step)
                saved_at = step
                bar.milestone()
        if hooks.on_checkpoint is not None and trainer.step_count != saved_at:
            hooks.on_checkpoint(trainer.step_count)  # stopped early: keep every step done
            bar.milestone()
    return history


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
    place
        This process's :class:`~srdvol.training.trainer.Rank` in a distributed run.
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
        place: Rank = SINGLE_PROCESS,
        make_trainer: Callable[..., Trainer] = Trainer,
        on_checkpoint: Callable[[Path, int], None] | None = None,
    ) -> None:
        self.plan = plan
        self.rank = int(place.rank)
        self.world_size = int(place.world_size)
        self.device = torch.device(device)
        self.on_checkpoint = on_checkpoint
        self._saved_at = time.monotonic()
        self.image = plan.open_image()
        self._rng: torch.Tensor | None = None
        saved = plan.saved_state()
        #: Step of the latest training state on disk (None: none written or resumed yet).
        self.saved_step: int | None = None if saved is None else int(saved["trainer"]["step"])
        with self._own_streams():
            self.trainer = make_trainer(
                build_network(plan.config),
                plan.options,
                stats=plan.stats,
                device=self.device,
                place=place,
            )
            self.sampler = PatchSampler(
                self.image,
                patch=plan.read_shape,
                seed=plan.options.seed,
                rank=self.rank,
                world_size=self.world_size,
                batch_size=plan.batch_size,
                read_ahead=True,  # the next batch's chunks are read while a step trains
            )
            self.losses: list[float] = []
            if saved is not None:
                self.trainer.load_state_dict(saved["trainer"])
                load_streams(saved["ranks"][self.rank], self.trainer, self.sampler)
                self.losses = list(saved["losses"])
                if self.rank == 0:
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
            torch.manual_seed(self.plan.options.seed)
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
        ranks = gather_objects(streams(self.trainer, self.sampler), self.world_size)
        if self.rank != 0:
            return
        state = {
            "options": self.plan.must_match,
            "stats": self.plan.stats.to_dict(),
            "trainer": self.trainer.state_dict(),
            "sampler": ranks[0]["sampler"],
            "ranks": ranks,
            "losses": self.losses,
        }
        save_state(self.plan.state_path, state)
        self.saved_step = self.step
        self._saved_at = time.monotonic()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.plan.state_path, self.step if step is None else step)

    def _state_is_old(self) -> bool:
        return time.monotonic() - self._saved_at >= CHECKPOINT_SECONDS

    def advance(
        self,
        until: int,
        *,
        progress: bool = False,
        on_step: Callable[[int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Train up to step ``until`` (checkpointing every ``checkpoint_every`` steps of the
        plan, as :func:`run_loop` does); return the step reached, which is less than ``until``
        when ``should_stop`` said so."""
        hooks = LoopHooks(
            on_checkpoint=self.checkpoint,
            on_step=on_step,
            should_stop=should_stop,
            # one process only: every rank of a distributed run must checkpoint at the same step
            checkpoint_due=self._state_is_old if self.world_size == 1 else None,
        )
        with self._own_streams():
            run_loop(
                self.trainer,
                self.sampler,
                steps=self.plan.steps,
                until=until,
                checkpoint_every=self.plan.options.checkpoint_every,
                hooks=hooks,
                progress=progress,
                losses=self.losses,
            )
        return self.step

    def finish(self) -> ModelRecord:
        """The model's record; rank 0 writes the model file."""
        self.sampler.close()
        record = model_record(self.plan, self.image, self.trainer, self.losses)
        if self.rank == 0:
            write_model(self.plan.model_path, self.trainer.network, record)
        return record

    def kept(self) -> str:
        """What an interrupted run leaves behind, in words."""
        return kept_text(self.saved_step, self.plan.steps, self.plan.state_path)


def run_training(
    plan: TrainingPlan,
    *,
    device: torch.device | str = "cpu",
    place: Rank = SINGLE_PROCESS,
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
    place
        This process's :class:`~srdvol.training.trainer.Rank` in a distributed run.
    progress
        Show the steps' progress (on every rank that asks; distributed runs ask on none).
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
        place=place,
        make_trainer=make_trainer,
        on_checkpoint=on_checkpoint,
    )
    stop_after = plan.options.stop_after
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)
    try:
        with interrupt.deferred():
            reached = run.advance(
                end,
                progress=progress,
                should_stop=lambda: agree(
                    interrupt.requested() is not None, place.world_size, run.device
                ),
            )
            if reached < end:
                raise interrupt.interruption()
    except KeyboardInterrupt as exc:  # stopped at a step, or a second Ctrl-C cut a step short
        interrupt.keep(exc, run.kept())
        raise
    finally:
        run.sampler.close()  # no more batches to read ahead, whatever ended the steps
    if on_finish is not None:
        on_finish(run.trainer)
    return run.finish()
