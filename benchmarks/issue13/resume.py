"""Finish a ``benchmarks/quality.py --workdir --keep`` training from its saved state (issue 13).

A ``quality.py`` training stopped early leaves ``model-P-S.safetensors.state`` beside its
noisy movie; this resumes it (``TrainOptions(resume=True)`` with the state's own options) to
``STEPS`` on ``THREADS`` torch threads and writes the model where ``quality.py`` would have,
saving the state every 250 steps so that it can be stopped again::

    python benchmarks/issue13/resume.py /tmp/w 0.5-2 4250 --threads 2

Training resumed from a state continues the same sampling and optimiser; on another thread
count the weights differ from an uninterrupted run in their last digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from snapshot import saved_training  # this script's folder, first on sys.path

from srdvol.model.device import resolve_device
from srdvol.training.loop import run_training
from srdvol.training.plan import prepare_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("tag", help="P-S, as in model-P-S.safetensors")
    parser.add_argument("steps", type=int, help="the training's full number of steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.workdir / f"model-{args.tag}.safetensors"
    state, options = saved_training(
        args.workdir, args.tag, steps=args.steps, resume=True, checkpoint_every=250
    )
    print(f"resuming {model.name} at step {state['trainer']['step']}", flush=True)
    plan = prepare_training(args.workdir / f"noisy-{args.tag}.zarr", model, options)
    wall, cpu = time.perf_counter(), time.process_time()
    run_training(plan, device=resolve_device("cpu"))
    print(
        f"done: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU",
        flush=True,
    )


if __name__ == "__main__":
    main()
