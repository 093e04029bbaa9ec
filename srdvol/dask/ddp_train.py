"""srdvol's training with one DistributedDataParallel rank per Dask worker.

The client plans the run (:func:`srdvol.training.plan.prepare_training`: every check, the
statistics, the resume state), then submits, per rank, a chain of *segment* tasks, all at once:
segment k trains up to the k-th checkpoint, depends on segment k-1 of the same rank and is pinned
to the same worker, so the dashboard shows training advance as segments finish
(``srdvol-training`` N of ranks x segments). The process group and the
:class:`~srdvol.training.loop.TrainingRun` stay alive in the worker process between segments,
keyed by the job id, and are torn down after the last segment, on a stop, or on a failure.

Rank 0 reports every step on the job's event topic; the client turns the reports into one
progress display whose samples/s is the global rate (global samples over the client's wall
time). Ctrl-C or SIGTERM on the client (or on the workers' process group) stops every rank at
the same step, saves the training state and raises :class:`srdvol.interrupt.Interrupted` noting
it. A worker that dies ends the run with a message naming it, the step and the last checkpoint
(:mod:`srdvol.dask.supervise`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from distributed import Client, Future

from srdvol import interrupt
from srdvol.dask.ranks import DDPContext, GroupSpec, RankOptions
from srdvol.dask.segments import drop_session, request_stop, segment_ends, train_segment
from srdvol.dask.supervise import (
    POLL,
    Job,
    StepReport,
    Watch,
    choose_backend,
    choose_workers,
    rendezvous,
    reporter,
    subscribed,
    supervise,
)
from srdvol.dask.workers import WorkerWatch, live_workers
from srdvol.options import ReadOptions, TrainOptions, merge, refuse_unknown
from srdvol.training.loop import run_training
from srdvol.training.plan import TrainingPlan, prepare_training
from srdvol.training.state import kept_text
from srdvol.training.trainer import Rank, Trainer

__all__ = ["SEGMENT_PREFIX", "plan_training", "train_distributed", "train_rank"]

logger = logging.getLogger(__name__)

#: Seconds the client waits for the ranks to save their state after a Ctrl-C or SIGTERM.
STOP_GRACE = 300.0
#: Task-name prefix of the training segments (what the dashboard shows).
SEGMENT_PREFIX = "srdvol-training"
_ALL_WORKERS = RankOptions()


# --------------------------------------------------------------------------------------------
# Client side


def _plan(
    client: Client,
    source: Any,
    model_path: str | os.PathLike[str],
    options: TrainOptions,
    *,
    read: ReadOptions,
    ranks: RankOptions,
) -> tuple[TrainingPlan, list[tuple[str, str]], bool]:
    chosen, on_gpus = choose_workers(client, ranks.workers)
    plan = prepare_training(source, model_path, options, read=read, world_size=len(chosen))
    return plan, chosen, on_gpus


def plan_training(
    client: Client,
    source: Any,
    model_path: str | os.PathLike[str],
    options: TrainOptions | None = None,
    *,
    read: ReadOptions | None = None,
    ranks: RankOptions = _ALL_WORKERS,
    **changes: Any,
) -> dict[str, Any]:
    """Check the options and the data on the client; return the keyword arguments of
    :func:`train_rank` (what every rank needs, small enough to travel through the scheduler).

    The checks are :func:`srdvol.training.plan.prepare_training`'s for as many ranks as
    workers are chosen, so a distributed run accepts and refuses what
    :func:`srdvol.training.loop.train` does; like it, starting afresh with ``overwrite``
    deletes a stale training state. The result also holds ``"workers"``, the chosen worker
    addresses in rank order (pop it before sending).
    """
    read = merge(read, ReadOptions, changes)
    options = merge(options, TrainOptions, changes)
    refuse_unknown(changes, "a training option")
    plan, chosen, _ = _plan(client, source, model_path, options, read=read, ranks=ranks)
    return {
        "plan": plan.portable(),  # without the state's tensors: each rank reads the file
        "workers": [a for a, _ in chosen],
    }


def train_rank(
    ctx: DDPContext,
    *,
    plan: TrainingPlan,
    on_finish: Callable[[Trainer], None] | None = None,
) -> Any:
    """One rank of a whole training in one task (for :func:`srdvol.dask.ranks.run_distributed`):
    :func:`srdvol.training.loop.run_training` with a DDP-wrapped network, this rank's patch
    stream and progress reports to the client.

    Every rank checkpoints at the same steps (the per-rank random streams are gathered); rank 0
    writes the training state and, at the end, the model file, and returns the model record.
    ``plan`` is the :class:`~srdvol.training.plan.TrainingPlan` of :func:`plan_training`;
    ``on_finish`` is passed to :func:`~srdvol.training.loop.run_training` (called on every rank
    with its trainer when the loop ends). :func:`train_distributed` runs the same training as
    segment tasks instead.
    """
    from functools import partial

    record = run_training(
        plan,
        device=ctx.device,
        place=Rank(ctx.rank, ctx.world_size, ctx.wrap),
        make_trainer=partial(
            _ReportingTrainer, ctx=ctx, samples_per_step=plan.batch_size * ctx.world_size
        ),
        on_checkpoint=lambda path, step: ctx.checkpoint_written(str(path), step),
        on_finish=on_finish,
    )
    return record if ctx.is_main else None


class _ReportingTrainer(Trainer):
    """A Trainer that reports every step to the client (rank 0)."""

    def __init__(self, *args: Any, ctx: DDPContext, samples_per_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        self.samples_per_step = samples_per_step
        self._first: int | None = None

    def step(self, batch: Any) -> float:
        if self._first is None:
            self._first = self.step_count  # after a resume: count this run's samples only
        loss = super().step(batch)
        samples = (self.step_count - self._first) * self.samples_per_step
        self.ctx.report(self.step_count, total=self.steps, loss=loss, samples=samples)
        return loss


def _start_step(plan: TrainingPlan) -> int:
    saved = plan.saved_state()
    return int(saved["trainer"]["step"]) if saved is not None else 0


def _submit_segments(
    client: Client, plan: TrainingPlan, addresses: list[str], group: GroupSpec, job_id: str
) -> tuple[list[Future], dict[str, int], list[Future]]:
    """Every rank's chain of segments: (all futures, rank by key, each rank's last segment)."""
    start = _start_step(plan)
    stop_after = plan.options.stop_after
    end = plan.steps if stop_after is None else min(plan.steps, stop_after)
    ends = segment_ends(start, end, plan.options.checkpoint_every)
    portable = plan.portable()
    logger.info(
        "distributed training on %d ranks via %s (%s), %d segments",
        len(addresses),
        group.init_method,
        group.backend,
        len(ends),
    )
    futures: list[Future] = []
    rank_of: dict[str, int] = {}
    last: list[Future] = []
    for rank, address in enumerate(addresses):
        previous: Future | None = None
        for k, until in enumerate(ends):
            previous = client.submit(
                train_segment,
                previous,
                job=job_id,
                segment=k,
                until=until,
                last=k == len(ends) - 1,
                plan=portable,
                group=replace(group, rank=rank),
                workers=[address],
                allow_other_workers=False,
                resources={"GPU": 1} if group.backend == "nccl" else None,
                pure=False,
                key=f"{SEGMENT_PREFIX}-{job_id}-r{rank}-s{k}",
            )
            futures.append(previous)
            rank_of[previous.key] = rank
        assert previous is not None
        last.append(previous)
    return futures, rank_of, last


def _run_segments(
    client: Client,
    plan: TrainingPlan,
    chosen: list[tuple[str, str]],
    *,
    ranks: RankOptions,
    backend: str,
    on_report: Callable[[dict[str, Any]], None],
    watch: Watch,
) -> Any:
    """Submit every rank's chain of segments, supervise them, return rank 0's result."""
    addresses = [a for a, _ in chosen]
    job_id = uuid.uuid4().hex[:12]
    topic = f"srdvol-ddp-{job_id}"
    init_method = rendezvous(client, addresses[0])
    group = GroupSpec(0, len(addresses), init_method, backend, ranks.timeout, topic)
    watch.step, watch.total = _start_step(plan), plan.steps
    with subscribed(client, topic) as events:
        futures, rank_of, last = _submit_segments(client, plan, addresses, group, job_id)
        job = Job(
            client,
            chosen,
            futures,
            rank_of,
            events,
            watch,
            on_report,
            WorkerWatch(client, addresses),
        )
        try:
            supervise(job)
        except KeyboardInterrupt as exc:
            interrupt.keep(exc, _stop(job, job_id, last, plan))
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                alive = [a for a in addresses if a in live_workers(client)]
                client.run(drop_session, job_id, workers=alive, on_error="ignore")
            raise
        finally:
            client.cancel([f for f in futures if not f.done()], force=True)
        return last[0].result()


def _stop(job: Job, job_id: str, last: list[Future], plan: TrainingPlan) -> str:
    """After a Ctrl-C/SIGTERM: ask every rank to stop at its next step, wait for the saved
    state (a second signal cuts this short), say what was kept."""
    try:
        with interrupt.deferred():
            with contextlib.suppress(Exception):
                job.client.run(request_stop, job_id, workers=[a for a, _ in job.ranks])
            deadline = time.monotonic() + STOP_GRACE
            while time.monotonic() < deadline and not all(f.done() for f in last):
                job.drain()
                if job.workers.lost():
                    break
                time.sleep(POLL)
            interrupt.clear()  # the request is handled here, not again on leaving the scope
    except KeyboardInterrupt:
        pass  # a second signal: stop waiting; say what is known to be saved
    job.drain()
    saved = [f.result() for f in last[:1] if f.status == "finished"]
    step = saved[0]["saved_step"] if saved else None
    if step is None and job.watch.checkpoint:
        step = job.watch.checkpoint_step
    elif step is None and plan.resume:
        step = _start_step(plan)
    return kept_text(step, plan.steps, plan.state_path)


def train_distributed(
    client: Client,
    source: Any,
    model_path: str | os.PathLike[str],
    options: TrainOptions | None = None,
    *,
    read: ReadOptions | None = None,
    ranks: RankOptions = _ALL_WORKERS,
    progress: bool | Callable[[StepReport], None] = True,
    **changes: Any,
) -> Any:
    """Train an SRDTrans model with one DistributedDataParallel rank per Dask worker.

    Options mean what they mean for :func:`srdvol.training.loop.train`, except ``batch_size``,
    which is per rank: the global batch is ``batch_size * ranks`` patches, whose gradients DDP
    averages. The learning rate is not scaled with the number of ranks: averaging keeps the
    gradient's size and only lowers its noise, and Adam already divides each step by the
    gradient's running RMS; with many ranks a larger ``lr`` (e.g. times sqrt(ranks)) may pay,
    which is left to the user. Each rank samples its own patches lazily from the store; rank 0
    writes ``MODEL.state`` every ``checkpoint_every`` steps and the model file at the end.
    ``source`` and ``model_path`` must be reachable under the same names from every worker (a
    shared file system or a URL).

    Parameters
    ----------
    client
        Client of the cluster (:func:`srdvol.dask.cluster.open_cluster`).
    source, model_path, options, read, **changes
        As for :func:`srdvol.training.loop.train`.
    ranks
        Which workers train (:class:`~srdvol.dask.ranks.RankOptions`: every GPU worker, or
        every worker when none has a GPU, by default), the backend and the collectives' timeout.
    progress
        Show the training's progress on the client (:mod:`srdvol.progress`: step of total,
        loss, global samples/s, ETA), or a function that receives every
        :class:`~srdvol.dask.supervise.StepReport` report instead.

    Returns
    -------
    ModelRecord
        The record written with the model.

    Raises
    ------
    TrainingInterruptedError
        If a worker dies or loses contact; the message names the last training state, and
        ``resume=True`` continues from it (with the same number of ranks).
    srdvol.interrupt.Interrupted
        On Ctrl-C or SIGTERM, after every rank saved the state (noted on the exception).
    """
    from srdvol import progress as progress_family

    read = merge(read, ReadOptions, changes)
    options = merge(options, TrainOptions, changes)
    refuse_unknown(changes, "a training option")
    plan, chosen, on_gpus = _plan(client, source, model_path, options, read=read, ranks=ranks)
    if plan.sampling_reason and progress:
        print(f"sampling auto: {plan.sampling_reason}")  # as single-process training prints
    watch = Watch()
    on_progress = progress if callable(progress) else None
    with progress_family.training(
        plan.steps,
        done=_start_step(plan),
        samples_per_step=plan.batch_size * len(chosen),
        enabled=progress is True,
    ) as bar:
        forward = reporter(on_progress, watch)

        def on_report(msg: dict[str, Any]) -> None:
            forward(msg)
            if msg.get("kind") == "progress":
                bar.update(int(msg["step"]), total=int(msg["total"]), loss=float(msg["loss"]))
            elif msg.get("kind") == "checkpoint":
                bar.milestone()

        result = _run_segments(
            client,
            plan,
            chosen,
            ranks=ranks,
            backend=choose_backend(on_gpus, ranks.backend),
            on_report=on_report,
            watch=watch,
        )
    if result.get("stopped"):  # a worker was signalled on its own: the state is saved
        stopped = interrupt.Interrupted(result.get("signal") or signal.SIGTERM)
        interrupt.keep(stopped, kept_text(result["saved_step"], plan.steps, plan.state_path))
        raise stopped
    return result["record"]
