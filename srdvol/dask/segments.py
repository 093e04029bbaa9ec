"""The worker side of srdvol's distributed training: one training session per rank that lives
in the worker process across the rank's segment tasks (:mod:`srdvol.dask.ddp_train` submits
them).

A session holds the rank's :class:`~srdvol.training.loop.TrainingRun` and its joined process
group, keyed by the job id; segment k trains up to the k-th checkpoint; the session is torn down
after the last segment, on a stop, or on a failure.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from srdvol import interrupt
from srdvol.dask.ranks import DDPContext, GroupSpec, join_group, leave_group, working
from srdvol.training.collective import agree
from srdvol.training.loop import TrainingRun
from srdvol.training.plan import TrainingPlan
from srdvol.training.trainer import Rank

__all__ = ["drop_session", "request_stop", "segment_ends", "train_segment"]


@dataclass
class _Session:
    """One rank's training job in this worker process, between its segment tasks."""

    run: TrainingRun
    ctx: DDPContext
    start: int
    samples_per_step: int
    stop: bool = False
    busy: bool = False

    def should_stop(self) -> bool:
        """Every rank agrees (one tiny all-reduce per step) whether any was asked to stop."""
        asked = self.stop or interrupt.requested() is not None
        return agree(asked, self.ctx.world_size, self.run.device)

    def report(self, step: int, loss: float) -> None:
        """Rank 0's report of one step to the client."""
        self.ctx.report(
            step,
            total=self.run.plan.steps,
            loss=loss,
            samples=(step - self.start) * self.samples_per_step,
        )


_SESSIONS: dict[str, _Session] = {}
_STOPS: set[str] = set()  # stop requests that arrived before their session opened
_SESSIONS_LOCK = threading.Lock()


def _open_session(job: str, *, plan: TrainingPlan, group: GroupSpec) -> _Session:
    interrupt.clear()  # a signal recorded before this job is not a request to stop it
    device = join_group(group)
    try:
        ctx = DDPContext.joined(group, device)
        run = TrainingRun(
            plan,
            device=device,
            place=Rank(group.rank, group.world_size, ctx.wrap),
            on_checkpoint=lambda path, step: ctx.checkpoint_written(str(path), step),
        )
    except BaseException:
        leave_group()
        raise
    per_step = plan.batch_size * group.world_size
    session = _Session(run, ctx, start=run.step, samples_per_step=per_step)
    with _SESSIONS_LOCK:
        _SESSIONS[job] = session
        session.stop = job in _STOPS
    return session


def _close_session(job: str) -> None:
    with _SESSIONS_LOCK:
        _SESSIONS.pop(job, None)
        _STOPS.discard(job)
    leave_group()


def request_stop(job: str) -> bool:
    """Ask this worker's rank of ``job`` to stop at its next step (runs on the worker)."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(job)
        if session is None:
            _STOPS.add(job)
            return False
        session.stop = True
        return True


def drop_session(job: str) -> bool:
    """Forget an idle session of a failed job (runs on the worker); a busy one ends itself."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(job)
        if session is None or session.busy:
            return False
    _close_session(job)
    return True


def _session(job: str, segment: int, plan: TrainingPlan, group: GroupSpec) -> _Session:
    if segment == 0:
        return _open_session(job, plan=plan, group=group)
    with _SESSIONS_LOCK:
        found = _SESSIONS.get(job)
    if found is None:
        raise RuntimeError(f"training job {job} has no session on this worker (it was restarted)")
    return found


def train_segment(
    previous: dict[str, Any] | None,
    *,
    job: str,
    segment: int,
    until: int,
    last: bool,
    plan: TrainingPlan,
    group: GroupSpec,
) -> dict[str, Any]:
    """One segment of one rank: train up to step ``until``; the last one writes the model.

    ``previous`` is the result of the segment before (its dependency); after a stop the
    remaining segments only pass the stopped result on.
    """
    if previous is not None and previous.get("stopped"):
        return previous
    with working(job):
        session = _session(job, segment, plan, group)
        session.busy = True
        try:
            if session.run.device.type == "cuda":
                import torch

                torch.cuda.set_device(0)  # per thread: a segment may run on another thread
            reached = session.run.advance(
                until,
                on_step=session.report if session.ctx.is_main else None,
                should_stop=session.should_stop,
            )
            stopped = reached < until
            result: dict[str, Any] = {
                "step": reached,
                "saved_step": session.run.saved_step,
                "stopped": stopped,
                "signal": interrupt.requested(),
                "record": None,
            }
            if last and not stopped:
                record = session.run.finish()
                result["record"] = record if session.ctx.is_main else None
        except BaseException:
            session.busy = False
            _close_session(job)
            raise
    session.busy = False
    if last or stopped:
        _close_session(job)
    return result


def segment_ends(start: int, end: int, every: int) -> list[int]:
    """The step each segment trains up to: every checkpoint after ``start``, then ``end``."""
    every = max(1, int(every))
    ends = [step for step in range((start // every + 1) * every, end, every) if step > start]
    return [*ends, end]
