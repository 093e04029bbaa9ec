"""A model file from a ``quality.py`` training's latest state, for prototypes (issue 13).

``benchmarks/quality.py --keep`` writes its training state beside the model
(``model-P-S.safetensors.state``, every ten minutes or so). When a training cannot finish in the
time there is, this writes the state's weights as a model file that ``srdvol predict`` and
``restore_sweep.py`` read; its record says how many steps it had::

    python benchmarks/issue13/snapshot.py WORKDIR 0.5-1 OUT/model-0.5-1.safetensors

A snapshot is not an acceptance model: its steps are whatever the state held.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import torch

from srdvol.model.network import build_network
from srdvol.ngff.read import open_image
from srdvol.options import TrainOptions
from srdvol.training.plan import prepare_training
from srdvol.training.state import model_record, write_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality import NETWORKS


def saved_training(
    workdir: Path, tag: str, network: str = "default", **changes: Any
) -> tuple[dict, TrainOptions]:
    """The training state ``model-TAG.safetensors.state`` in ``workdir`` and the options it was
    trained with (``steps``: the state's step), with ``changes`` on top."""
    path = workdir / f"model-{tag}.safetensors.state"
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["options"]
    options = {
        "patch": tuple(saved["patch"]),
        "steps": int(state["trainer"]["step"]),
        "batch_size": saved["batch_size"],
        "lr": saved["lr"],
        "seed": int(saved["seed"]),
        "network": NETWORKS[network](saved["patch"][0]),
    }
    return state, TrainOptions(**(options | changes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("tag", help="P-S, as in model-P-S.safetensors")
    parser.add_argument("out", type=Path)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="default")
    args = parser.parse_args()
    state, options = saved_training(args.workdir, args.tag, args.network, overwrite=True)
    step = options.steps
    movie = args.workdir / f"noisy-{args.tag}.zarr"
    plan = prepare_training(movie, args.out, options)
    network = build_network(plan.config)
    network.load_state_dict(state["trainer"]["network"])
    trainer = types.SimpleNamespace(step_count=step, network=network)
    record = model_record(plan, open_image(movie), trainer, state["losses"])
    write_model(args.out, network.eval(), record)
    print(f"{args.out}: the weights of step {step}")


if __name__ == "__main__":
    main()
