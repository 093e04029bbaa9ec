"""Distributed training keeps its promises, through srdvol's own path (gloo, 2 real workers).

- Both ranks end with identical weights (every rank's final weights are gathered through the
  ``on_finish`` hook of :func:`srdvol.dask.ddp_train.train_rank`).
- The result equals one process that takes each step on the concatenated batches of both ranks,
  with each half's pairs drawn from that rank's stream, through the real :class:`Trainer`
  (same schedule, clipping, Adam). A run without the gradient all-reduce would be rank 0
  training alone on its half; the test checks that this lands far outside the tolerance.
- The same seed gives bit-identical weights in two separate processes at torch's default
  thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from distributed import Client, LocalCluster

from srdvol.dask.ddp_train import plan_training, train_rank
from srdvol.dask.ranks import RankOptions, run_distributed
from srdvol.model.checkpoint import load_model
from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network
from srdvol.training.patches import PatchSampler
from srdvol.training.trainer import Rank, Trainer

STEPS = 5
BATCH = 2  # per rank
SEED = 3
#: Weights of the DDP run and of the one-process reference agree to float32 summation order
#: (measured: 1.5e-8 apart; rank 0 alone, without the all-reduce, ends 6e-3 away).
ATOL = 2e-6


def _numpy_state(network: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in network.state_dict().items()}


def _rank_with_weights(ctx: Any, **plan: Any) -> tuple[Any, list[dict[str, np.ndarray]]]:
    """srdvol's rank function, then every rank's final weights gathered on every rank."""
    import torch.distributed as dist

    final: dict[str, np.ndarray] = {}
    record = train_rank(ctx, **plan, on_finish=lambda t: final.update(_numpy_state(t.network)))
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, final)  # the process group is open until fn returns
    return record, gathered


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ddp") / "movie.zarr"
    data = np.random.default_rng(0).poisson(200.0, size=(32, 24, 24)).astype(np.uint16)
    zarr.create_array(str(path), data=data, chunks=(16, 12, 12))
    return str(path)


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        yield c


OPTIONS: dict[str, Any] = {
    "patch": (16, 16, 16),
    "batch_size": BATCH,
    "steps": STEPS,
    "seed": SEED,
    "axes": "tyx",
    "checkpoint_every": 1000,
}


class _RanksInOneProcess(Trainer):
    """A Trainer fed both ranks' batches at once; each half gets its own rank's pair stream."""

    def __init__(self, *args: Any, generators: list[torch.Generator], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generators = generators

    def pairs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = []
        for generator, half in zip(self.generators, batch.chunk(len(self.generators)), strict=True):
            self.generator = generator
            parts.append(super().pairs(half))
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def _one_process(plan: Any, image: Any, *, ranks: list[int], world_size: int = 2) -> dict:
    """Train in this process on the patch and pair streams of ``ranks`` (of ``world_size``)."""
    seed = plan.options.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # as run_training seeds before building the network
        network = build_network(plan.config)
    # the streams of a distributed run: rank r's generator and sampler of a 2-rank world
    generators = [
        Trainer(
            build_network(plan.config),
            plan.options,
            stats=plan.stats,
            place=Rank(r, world_size),
        ).generator
        for r in ranks
    ]
    trainer = _RanksInOneProcess(network, plan.options, stats=plan.stats, generators=generators)
    samplers = [
        PatchSampler(
            image,
            patch=plan.read_shape,
            seed=seed,
            rank=r,
            world_size=world_size,
            batch_size=plan.batch_size,
        )
        for r in ranks
    ]
    for _ in range(plan.steps):
        trainer.step(np.concatenate([s.sample() for s in samplers]))
    return _numpy_state(trainer.network)


def _max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
def test_ddp_ranks_agree_and_equal_one_process_on_both_batches(client, source, tmp_path):
    from srdvol.ngff.read import open_image

    model = tmp_path / "model.srdvol"
    options = {**OPTIONS, "network": NetworkConfig.tiny(16)}
    kwargs = plan_training(client, source, model, **options)
    workers = kwargs.pop("workers")
    assert len(workers) == 2
    record, ranks = run_distributed(
        client, _rank_with_weights, ranks=RankOptions(workers, timeout=120), **kwargs
    )
    assert record.steps == STEPS

    # (a) both ranks end with the same weights, bit for bit, and rank 0 wrote them
    assert _max_difference(ranks[0], ranks[1]) == 0.0
    written = _numpy_state(load_model(model)[0])
    assert _max_difference(written, ranks[0]) == 0.0

    # (b) equal to one process fed both ranks' batches (their patch and pair streams)
    plan = kwargs["plan"]
    image = open_image(source, axes="tyx")
    both = _one_process(plan, image, ranks=[0, 1])
    difference = _max_difference(ranks[0], both)
    assert difference <= ATOL, difference

    # Without the all-reduce, rank 0 would train on its own half only: far from both.
    alone = _one_process(plan, image, ranks=[0])
    assert _max_difference(alone, both) > 100 * ATOL
    # and the weights moved: the comparison is not between untouched copies
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.options.seed)
        initial = _numpy_state(build_network(plan.config))
    assert _max_difference(initial, both) > 100 * ATOL


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from srdvol import train
    from srdvol.model.config import NetworkConfig

    source, model = sys.argv[1], sys.argv[2]
    network = NetworkConfig(channels=(4, 4, 8, 8), embed_dim=16, heads=2, patch_t=16)
    record = train(source, model, patch=(16, 16, 16), steps=4, batch_size=2, seed=11,
                   network=network, axes="tyx", progress=False, device="cpu")
    print(json.dumps({"threads": torch.get_num_threads(), "steps": record.steps}))
    """
)


@pytest.mark.slow
def test_same_seed_same_weights_in_separate_processes_at_default_threads(source, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    runs = []
    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, str(script), source, str(tmp_path / f"{name}.srdvol")],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert all(run["steps"] == 4 for run in runs)
    if (os.cpu_count() or 1) > 1:
        assert runs[0]["threads"] > 1  # torch's default, not forced to one thread
    a = load_model(tmp_path / "a.srdvol")[0].state_dict()
    b = load_model(tmp_path / "b.srdvol")[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
