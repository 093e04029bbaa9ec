"""Tests of srdvol.dask.ranks and srdvol.dask.ddp_train: gloo process groups across the worker
processes of a real LocalCluster."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster, SchedulerPlugin
from torch import nn

from srdvol.dask.ranks import DDPContext, RankOptions, run_distributed
from srdvol.dask.supervise import StepReport
from srdvol.errors import DataError, TrainingInterruptedError

STEPS = 4
BATCH = 2  # per rank


def _tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1))


def _global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(size, 1, 4, 6, 6)).astype(np.float32)
    y = (0.5 * x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def _sgd_steps(model: nn.Module, batches, step_fn) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step_fn(step)


def _train_ddp(
    ctx: DDPContext, *, steps: int, out: str, die_at: int | None = None
) -> dict[str, np.ndarray]:
    """Each rank takes its half of every global batch; rank 0 checkpoints and reports."""
    torch.set_num_threads(1)
    net = _tiny_net(0)
    model = ctx.wrap(net)
    batches = []
    for step in range(steps):
        x, y = _global_batch(step, BATCH * ctx.world_size)
        part = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
        batches.append((x[part], y[part]))

    def after(step: int) -> None:
        done = step + 1
        if ctx.is_main:
            path = Path(out) / f"step-{done}.pt"
            torch.save(net.state_dict(), path)
            ctx.checkpoint_written(str(path), done)
            ctx.report(done, total=steps, loss=0.0, samples_per_s=1.0)
        if die_at is not None and done == die_at:
            time.sleep(0.5)  # let rank 0's reports reach the scheduler first
            if ctx.rank == 1:
                os._exit(1)  # the worker process dies without a word

    _sgd_steps(model, batches, after)
    if ctx.is_main:
        (Path(out) / "written-by").write_text(str(ctx.rank))
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _fails_on_rank_1(ctx: DDPContext) -> None:
    if ctx.rank == 1:
        raise DataError("movie.zarr", "the sample holds NaN values", "clean the data")
    import torch.distributed as dist

    dist.barrier()


@pytest.fixture
def cluster():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            host="127.0.0.1",
        ) as local,
        Client(local) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield client


def test_run_distributed_lets_rank_0_write_and_report(cluster, tmp_path):
    # The plumbing of run_distributed; that srdvol's DDP training averages gradients is shown
    # through the real training path in test_ddp_promises.py.
    seen: list[StepReport] = []
    weights = run_distributed(
        cluster,
        _train_ddp,
        steps=STEPS,
        out=str(tmp_path),
        on_progress=seen.append,
        ranks=RankOptions(timeout=60),
    )
    # rank 0's return value comes back: its trained weights, moved from the initial ones
    assert not np.allclose(weights["0.weight"], _tiny_net(0).state_dict()["0.weight"].numpy())
    assert (tmp_path / "written-by").read_text() == "0"
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == [
        f"step-{i}.pt" for i in range(1, STEPS + 1)
    ]
    assert [p.step for p in seen] == list(range(1, STEPS + 1))
    assert all(p.total == STEPS for p in seen)


def test_worker_dying_mid_training_names_worker_step_and_checkpoint(cluster, tmp_path):
    start = time.monotonic()
    with pytest.raises(TrainingInterruptedError) as info:
        run_distributed(
            cluster,
            _train_ddp,
            steps=50,
            out=str(tmp_path),
            die_at=2,
            ranks=RankOptions(timeout=30),
        )
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert message.startswith("distributed training: worker ")
    assert "rank 1" in message
    assert "at step 2 of 50" in message
    assert str(tmp_path / "step-2.pt") in message
    assert "resume" in message


def test_error_in_training_code_reaches_the_caller_unchanged(cluster):
    with pytest.raises(DataError, match="NaN values") as info:
        run_distributed(cluster, _fails_on_rank_1, ranks=RankOptions(timeout=30))
    assert info.value.subject == "movie.zarr"


# ------------------------------------------------------------------------------ srdvol training

TINY = {"patch": (16, 16, 16), "batch_size": 1, "axes": "tyx", "seed": 3}


def _tiny_network():
    from srdvol.model.config import NetworkConfig

    return NetworkConfig.tiny(16)


def _faulty_rank(ctx: DDPContext, *, die_at: int, **plan):
    """srdvol's rank function, except that rank 1's process dies drawing batch ``die_at``."""
    import itertools

    from srdvol.dask.ddp_train import train_rank
    from srdvol.training.patches import PatchSampler

    if ctx.rank == 1:
        original = PatchSampler.sample
        calls = itertools.count(1)

        def sample(self, *args, **kwargs):
            if next(calls) == die_at:
                time.sleep(1.0)  # let rank 0's last reports reach the client first
                os._exit(1)
            return original(self, *args, **kwargs)

        PatchSampler.sample = sample
    return train_rank(ctx, **plan)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from srdvol.model.checkpoint import load_model

    return load_model(path)[0].state_dict()


def test_train_distributed_writes_model_and_resumes_exactly_after_a_lost_worker(
    cluster, tmp_path, make_plain_array
):
    from srdvol.dask.ddp_train import plan_training, train_distributed
    from srdvol.model.checkpoint import read_record
    from srdvol.training.state import state_path

    source, _ = make_plain_array("movie.zarr", shape=(32, 24, 24), dtype="uint16")
    options = {**TINY, "network": _tiny_network(), "steps": 8, "checkpoint_every": 2}

    # uninterrupted reference run
    reference = tmp_path / "reference.srdvol"
    seen: list[StepReport] = []
    record = train_distributed(cluster, source, reference, progress=seen.append, **options)
    assert record.steps == 8
    assert read_record(reference).steps == 8
    assert [p.step for p in seen] == list(range(1, 9))
    assert all(p.samples_per_s > 0 for p in seen)
    saved = torch.load(state_path(reference), weights_only=True)
    assert len(saved["ranks"]) == 2
    assert saved["options"]["world_size"] == 2
    # the two ranks drew different patches (their streams differ)
    assert (
        saved["ranks"][0]["sampler"]["bit_generator"]
        != saved["ranks"][1]["sampler"]["bit_generator"]
    )

    # the same run, with rank 1's worker dying while it draws the batch of step 5
    model = tmp_path / "model.srdvol"
    plan = plan_training(cluster, source, model, **options)
    workers = plan.pop("workers")
    with pytest.raises(TrainingInterruptedError) as info:
        run_distributed(
            cluster, _faulty_rank, die_at=5, ranks=RankOptions(workers, timeout=30), **plan
        )
    message = str(info.value)
    assert "rank 1" in message
    assert "at step 4 of 8" in message
    assert f"the last checkpoint is {state_path(model)} (step 4)" in message
    assert not model.exists()  # only the training state was written

    # the nanny restarts the worker; resuming from rank 0's state ends with the same weights
    cluster.wait_for_workers(2, timeout=60)
    after: list[StepReport] = []
    resumed = train_distributed(
        cluster, source, model, resume=True, progress=after.append, **options
    )
    assert resumed.steps == 8
    assert [p.step for p in after] == [5, 6, 7, 8]  # it continued, it did not start again
    expected, got = _weights(reference), _weights(model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_planning_refuses_and_overwrites_like_single_process_training(
    cluster, tmp_path, make_plain_array
):
    from srdvol.dask.ddp_train import plan_training
    from srdvol.errors import ConfigError
    from srdvol.training.loop import train
    from srdvol.training.state import state_path

    source, _ = make_plain_array("movie.zarr", shape=(32, 24, 24), dtype="uint16")
    options = {**TINY, "network": _tiny_network(), "steps": 2}
    planning = dict(options)
    one = RankOptions(workers=1)
    model = tmp_path / "m.srdvol"
    train(
        source, model, stop_after=1, progress=False, **options
    )  # one rank, spatial sampling, state kept

    # a resume that asks for another sampling is refused by both paths; "auto" takes the saved
    for start in (
        lambda **kw: train(source, model, progress=False, **options, **kw),
        lambda **kw: plan_training(cluster, source, model, ranks=one, **planning, **kw),
    ):
        with pytest.raises(ConfigError, match="sampling"):
            start(resume=True, sampling="temporal")
    plan = plan_training(
        cluster, source, model, resume=True, sampling="auto", ranks=one, **planning
    )
    assert plan["plan"].sampling == "spatial"
    assert plan["plan"].resume

    # starting again with overwrite deletes the stale state, as train() does
    assert state_path(model).exists()
    plan = plan_training(cluster, source, model, overwrite=True, ranks=one, **planning)
    assert not plan["plan"].resume
    assert not state_path(model).exists()


# ------------------------------------------------------------------------------ worker liveness


class _SegmentLog(SchedulerPlugin):
    """Scheduler-side record of the training segments' transitions, in the order they happen
    (the scheduler's own view: no race with the client's progress reports)."""

    name = "srdvol-test-segment-log"

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        from srdvol.dask.ddp_train import SEGMENT_PREFIX

        if str(key).startswith(SEGMENT_PREFIX):
            self.events.append((str(key), finish))


def _segment_events(dask_scheduler) -> list[tuple[str, str]]:
    return list(dask_scheduler.plugins[_SegmentLog.name].events)


def test_an_empty_cached_snapshot_does_not_stop_training_and_segments_show_progress(
    cluster, tmp_path, make_plain_array, monkeypatch
):
    """Client.scheduler_info() can come back with no workers (its shared cache is refreshed
    every 2 s without the worker list); srdvol must not take that for dead workers. And all
    segments (ranks x checkpoint intervals) are known to the scheduler before the first one
    finishes, and they finish one by one in order, so the dashboard's bar shows training
    advance."""
    from distributed.client import SchedulerInfo

    from srdvol.dask.ddp_train import train_distributed

    cluster.register_plugin(_SegmentLog())
    empty = SchedulerInfo({**dict(cluster.scheduler_info()), "workers": {}})
    monkeypatch.setattr(cluster, "scheduler_info", lambda *args, **kwargs: empty)
    cluster._scheduler_identity = empty
    assert cluster.scheduler_info(n_workers=-1)["workers"] == {}  # the injection is in place

    source, _ = make_plain_array("movie.zarr", shape=(32, 24, 24), dtype="uint16")
    record = train_distributed(
        cluster,
        source,
        tmp_path / "m.srdvol",
        network=_tiny_network(),
        steps=6,
        checkpoint_every=2,
        progress=False,
        **TINY,
    )
    assert record.steps == 6
    assert (tmp_path / "m.srdvol").exists()
    events = cluster.run_on_scheduler(_segment_events)
    keys = list(dict.fromkeys(key for key, _ in events))
    assert len(keys) == 6  # 2 ranks x 3 segments
    first_done = next(i for i, (_, state) in enumerate(events) if state == "memory")
    known = {key for key, _ in events[:first_done]}
    assert known == set(keys)  # all submitted up front: the dashboard's total is right at once
    finished = [key for key, state in events if state == "memory"]
    assert len(finished) == 6
    for rank in ("r0", "r1"):
        order = [k.rsplit("-", 1)[-1] for k in finished if k.rsplit("-", 2)[-2] == rank]
        assert order == ["s0", "s1", "s2"]  # one segment after the other


def _pids(client: Client) -> dict[str, int]:
    return client.run(os.getpid)


def test_a_killed_worker_process_ends_the_run_naming_worker_step_and_checkpoint(
    cluster, tmp_path, make_plain_array
):
    import signal

    from srdvol.dask.ddp_train import train_distributed
    from srdvol.dask.workers import live_workers
    from srdvol.training.state import state_path

    source, _ = make_plain_array("movie.zarr", shape=(32, 24, 24), dtype="uint16")
    workers = live_workers(cluster)
    rank_1 = sorted(workers, key=lambda a: (str(workers[a]["name"]), a))[1]
    pid = _pids(cluster)[rank_1]
    killed: list[int] = []

    def kill_at_step_3(report: StepReport) -> None:
        if report.step >= 3 and not killed:
            os.kill(pid, signal.SIGKILL)  # the worker process dies without a word
            killed.append(report.step)

    model = tmp_path / "m.srdvol"
    start = time.monotonic()
    with pytest.raises(TrainingInterruptedError) as info:
        train_distributed(
            cluster,
            source,
            model,
            network=_tiny_network(),
            steps=200,
            checkpoint_every=2,
            ranks=RankOptions(timeout=30),
            progress=kill_at_step_3,
            **TINY,
        )
    assert killed and time.monotonic() - start < 120
    message = str(info.value)
    assert message.startswith("distributed training: worker ")
    assert f"({rank_1}, rank 1)" in message
    assert re.search(r"stopped at step \d+ of 200", message), message
    assert f"the last checkpoint is {state_path(model)} (step " in message
    assert "resume" in message
    cluster.wait_for_workers(2, timeout=60)  # the nanny brings a fresh worker up


def test_ctrl_c_stops_every_rank_saves_the_state_and_resume_is_exact(
    cluster, tmp_path, make_plain_array
):
    """A real SIGINT to this process while ranks train: they stop at the same step and save,
    the exception says where the state is, and resuming ends with the uninterrupted weights."""
    import signal

    from srdvol import interrupt
    from srdvol.dask.ddp_train import train_distributed
    from srdvol.training.state import state_path

    source, _ = make_plain_array("movie.zarr", shape=(32, 24, 24), dtype="uint16")
    # Enough steps that the ranks are still training when the interrupt takes effect on a
    # loaded machine (with 8, a full suite beside a benchmark once saw step 8 of 8).
    steps = 24
    options = {**TINY, "network": _tiny_network(), "steps": steps, "checkpoint_every": 4}
    reference = tmp_path / "reference.srdvol"
    train_distributed(cluster, source, reference, progress=False, **options)

    model = tmp_path / "model.srdvol"

    sent: list[int] = []

    def ctrl_c_at_step_2(report: StepReport) -> None:
        # reports come at an interval: the first one at step 2 or later, once
        if report.step >= 2 and not sent:
            sent.append(report.step)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as info, interrupt.handling():
        train_distributed(cluster, source, model, progress=ctrl_c_at_step_2, **options)
    assert interrupt.exit_code(info.value) == 130
    notes = interrupt.kept(info.value)
    saved = torch.load(state_path(model), weights_only=True)
    step = saved["trainer"]["step"]
    assert 2 <= step < steps
    assert notes == [f"training state at step {step} of {steps} saved to {state_path(model)}"]
    assert not model.exists()

    cluster.wait_for_workers(2, timeout=60)
    after: list[StepReport] = []
    resumed = train_distributed(
        cluster, source, model, resume=True, progress=after.append, **options
    )
    assert resumed.steps == steps
    assert [p.step for p in after] == list(range(step + 1, steps + 1))
    expected, got = _weights(reference), _weights(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
