"""Where a CPU training step goes: stages, network modules, and the costliest torch ops.

Simulates the demo's recording (96 frames of 96x96 px at 0.3 Hz, photons 2) unless ``--data``
names a store, then times training steps of the default network exactly as
:class:`srdvol.training.trainer.Trainer` takes them (deterministic CPU kernels, as training
runs), on batches from :class:`srdvol.training.patches.PatchSampler`. CPU time of this process is
reported, not wall time, so figures stay comparable on a machine that other jobs load (with one
torch thread CPU time is what the step costs; the script prints the load average beside it).

Three tables:

1. stages of one step (patch reading, normalisation, pairs + dihedral augmentation, forward,
   loss, backward, gradient clipping, Adam), CPU ms per step, median over the measured steps;
2. the network's modules (each encoder/decoder level, the time convolutions, the temporal and
   the Swin transformer), forward and forward + backward on the inputs they see in a step;
3. with ``--ops``, the torch profiler's top operators by self CPU time.

The script only uses public training classes and module attributes that exist since the first
network, so it also runs against an older checkout for a before/after comparison::

    python benchmarks/profile_training.py --threads 1 --ops
    git archive <old commit> srdvol | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/profile_training.py --threads 1 --ops
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median CPU milliseconds of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(1000 * (time.process_time() - start))
    return statistics.median(times)


def _recording(args: argparse.Namespace, folder: Path) -> Path:
    if args.data is not None:
        return args.data
    from srdvol.simulate import simulate

    noisy = folder / "noisy.zarr"
    simulate(noisy, truth=folder / "truth.zarr", frames=96, size=(96, 96), rate_hz=0.3, photons=2.0)
    return noisy


def stage_table(trainer: Any, sampler: Any, steps: int) -> list[tuple[str, float]]:
    """CPU ms per step of each stage of ``Trainer.step``, median over ``steps`` steps."""
    from srdvol.core.normalize import normalize
    from srdvol.training.pairs import spatial_loss

    names = ("read patches", "normalise", "pairs + dihedral", "forward", "loss", "backward")
    names += ("clip gradients", "Adam + schedule")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(steps):
        marks = [time.process_time()]
        batch = sampler.sample()
        marks.append(time.process_time())
        x = torch.from_numpy(normalize(batch, trainer.stats))
        marks.append(time.process_time())
        inputs, target_a, target_b = trainer.pairs(x)
        marks.append(time.process_time())
        trainer.model.train()
        prediction = trainer.model(inputs[:, None])[:, 0]
        marks.append(time.process_time())
        loss = spatial_loss(prediction, target_a, target_b)
        marks.append(time.process_time())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 1.0)
        marks.append(time.process_time())
        trainer.optimizer.step()
        trainer.schedule.step()
        marks.append(time.process_time())
        for name, start, stop in zip(names, marks, marks[1:], strict=False):
            times[name].append(1000 * (stop - start))
    return [(name, statistics.median(values)) for name, values in times.items()]


def module_table(
    network: Any, x: torch.Tensor, repeats: int
) -> list[tuple[str, Any, float, float]]:
    """Forward and forward+backward CPU ms of every network part on the input it sees."""
    parts = [(f"encoder level {i}", m) for i, m in enumerate(network.encoder.levels)]
    parts += [(f"encoder down {i}", m) for i, m in enumerate(network.encoder.downs)]
    parts += [("conv_in", network.conv_in), ("temporal transformer", network.temporal)]
    parts += [("Swin transformer", network.spatial), ("conv_out", network.conv_out)]
    parts += [(f"decoder up {i}", m) for i, m in enumerate(network.decoder.ups)]
    parts += [(f"decoder level {i}", m) for i, m in enumerate(network.decoder.levels)]
    seen: dict[str, tuple[torch.Tensor, torch.Size]] = {}
    hooks = [
        module.register_forward_hook(
            lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].detach(), out.shape))
        )
        for name, module in parts
    ]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, module in parts:
        inp, shape = seen[name]
        grad = torch.randn(shape)
        inp = inp.clone().requires_grad_(True)
        forward = _cpu_ms(lambda m=module, i=inp: m(i), repeats)
        both = _cpu_ms(lambda m=module, i=inp, g=grad: m(i).backward(g), repeats)
        rows.append((name, tuple(inp.shape), forward, both))
    return rows


def op_table(trainer: Any, sampler: Any, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    batches = [sampler.sample() for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            trainer.step(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after 3 warm-up)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", default="16,64,64", help="training patch T,Y,X (read size)")
    parser.add_argument("--data", type=Path, default=None, help="an image store to read from")
    parser.add_argument("--ops", action="store_true", help="also list the top torch operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = tuple(int(v) for v in args.patch.split(","))

    from srdvol.core.normalize import sample_statistics
    from srdvol.model.config import NetworkConfig
    from srdvol.model.network import build_network
    from srdvol.ngff.read import open_image
    from srdvol.options import TrainOptions
    from srdvol.training.patches import PatchSampler
    from srdvol.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as folder:
        image = open_image(_recording(args, Path(folder)))
        stats = sample_statistics(image)
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True)  # as srdvol's training runs on the CPU
        network = build_network(NetworkConfig(patch_t=patch[0]))
        trainer = Trainer(network, TrainOptions(steps=1000), stats=stats)
        sampler = PatchSampler(image, patch=patch, seed=0, batch_size=args.batch_size)
        for _ in range(3):
            trainer.step(sampler.sample())
        load = os.getloadavg()
        stages = stage_table(trainer, sampler, args.steps)
        x = torch.randn(args.batch_size, 1, patch[0], patch[1] // 2, patch[2] // 2)
        modules = module_table(network, x, repeats=max(3, args.steps // 3))
        ops = op_table(trainer, sampler, min(args.steps, 5), 25) if args.ops else ""

    total = sum(ms for _, ms in stages)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size} of "
        f"{patch} -> network input {tuple(x.shape)}; load average {load[0]:.1f}"
    )
    print("\n| stage | CPU ms/step | share |\n|---|---|---|")
    for name, ms in stages:
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print(f"| **step** | **{total:.1f}** | |")
    print(
        "\n| module | input | forward ms | forward + backward ms | share |\n|---|---|---|---|---|"
    )
    both_total = sum(row[3] for row in modules)
    for name, shape, forward, both in modules:
        print(f"| {name} | {shape} | {forward:.1f} | {both:.1f} | {100 * both / both_total:.0f}% |")
    print(f"| **sum** | | | **{both_total:.1f}** | |")
    if ops:
        print("\n" + ops)


if __name__ == "__main__":
    main()
