"""A training run's files: the training state beside the model, and the model's record.

``MODEL.state`` holds everything needed to continue exactly: weights, Adam moments, step,
schedule, every rank's random streams, the losses, and the options a resume must match. It is
written atomically (a crash mid-write leaves the previous one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xarray as xr
from torch import nn

from srdvol.errors import ConfigError, StoreNotFoundError, flag
from srdvol.model.checkpoint import ModelRecord, Normalization, save_model, weights_checksum
from srdvol.training.patches import PatchSampler
from srdvol.training.trainer import Trainer

if TYPE_CHECKING:
    from srdvol.training.plan import TrainingPlan

__all__ = [
    "STATE_SUFFIX",
    "check_resume",
    "kept_text",
    "load_state",
    "load_streams",
    "model_record",
    "save_state",
    "state_path",
    "streams",
    "write_model",
]

STATE_SUFFIX = ".state"


def state_path(model_path: str | os.PathLike[str]) -> Path:
    """Return the training-state file that sits next to ``model_path`` (``MODEL.state``)."""
    path = Path(model_path)
    return path.with_name(path.name + STATE_SUFFIX)


def kept_text(step: int | None, steps: int, path: str | os.PathLike[str]) -> str:
    """``"training state at step 3 of 8 saved to m.state"`` (or that none was saved)."""
    if step is None:
        return "no training step was saved yet"
    return f"training state at step {step} of {steps} saved to {os.fspath(path)}"


def streams(trainer: Trainer, sampler: PatchSampler) -> dict[str, Any]:
    """This rank's random streams, as the training state stores them per rank."""
    return {
        "trainer": {"generator": trainer.generator.get_state(), "torch_rng": torch.get_rng_state()},
        "sampler": sampler.state_dict(),
    }


def load_streams(streams: dict[str, Any], trainer: Trainer, sampler: PatchSampler) -> None:
    """Continue this rank's random streams from :func:`streams`' saved form."""
    sampler.load_state_dict(streams["sampler"])
    trainer.generator.set_state(streams["trainer"]["generator"])
    torch.set_rng_state(streams["trainer"]["torch_rng"])


def save_state(path: Path, state: dict[str, Any]) -> None:
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
            "delete it and train without [[resume]], or pass [[overwrite]]",
        ) from None
    return dict(state)


def check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a training state saved with other options (any of ``current``)."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise ConfigError(
                path,
                f"the saved training used {key}={saved.get(key)!r}, this run asks for {value!r}",
                f"resume with the same {key}, or pass {flag('overwrite')} to start again",
            )


def model_record(
    plan: TrainingPlan, image: xr.DataArray, trainer: Trainer, losses: list[float]
) -> ModelRecord:
    """What is written with the model: network, patch, normalisation, training data, steps."""
    tail = losses[-max(1, len(losses) // 20) :] if losses else []
    data = {
        "source": str(image.attrs.get("source", image.name or "")),
        "dims": "".join(str(d) for d in image.dims),
        "shape": [int(n) for n in image.shape],
        "dtype": str(image.dtype),
        "level": None if image.attrs.get("level") is None else int(image.attrs["level"]),
        "statistics": plan.stats.to_dict(),
        "batch_size": plan.options.batch_size,
        "lr": plan.options.lr,
        "loss": plan.options.loss.value,
        "final_loss": sum(tail) / len(tail) if tail else None,
    }
    return ModelRecord(
        network=plan.config,
        patch=plan.patch,
        sampling=plan.sampling,  # type: ignore[arg-type]
        normalization=Normalization(mean=plan.stats.mean, std=plan.stats.std),
        training_data=data,
        steps=trainer.step_count,
        seed=plan.options.seed,
        weights_sha256=weights_checksum(trainer.network.state_dict()),  # as save_model writes
    )


def write_model(path: Path, network: nn.Module, record: ModelRecord) -> None:
    """Write the model file (and its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, network, record)
