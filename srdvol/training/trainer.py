"""One optimiser step at a time: :class:`Trainer` and its learning-rate schedule.

The defaults, and why (upstream uses Adam lr 1e-4, betas (0.5, 0.999), batch 1 per GPU, constant
lr, on raw mean-centred intensities): srdvol feeds ``(x - mean) / std``, so the input has unit
scale whatever the detector gain, and a larger learning rate is stable. The default is Adam lr
1e-3 with upstream's betas, a linear warm-up over the first 5 % of the steps, a cosine decay to
10 % at the last step, the gradient norm clipped at 1, and batch 4 (benchmarks/RESULTS.md has
the measurements behind these choices).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from srdvol.core.normalize import Statistics, normalize
from srdvol.errors import ConfigError, flag
from srdvol.options import TrainOptions
from srdvol.training.collective import collective

__all__ = [
    "BETAS",
    "FINAL_LR_FRACTION",
    "GRAD_CLIP",
    "SINGLE_PROCESS",
    "WARMUP_FRACTION",
    "Rank",
    "Trainer",
    "lr_factor",
]

#: Adam betas of upstream SRDTrans (a short memory of the first moment suits noisy targets).
BETAS = (0.5, 0.999)
WARMUP_FRACTION = 0.05
#: Global gradient-norm limit (a safety net for high learning rates).
GRAD_CLIP = 1.0
FINAL_LR_FRACTION = 0.1


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``steps``: warm-up, then cosine decay."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine


@dataclass(frozen=True)
class Rank:
    """This process's place in a distributed run (one process by default).

    Attributes
    ----------
    rank, world_size
        This rank and the number of ranks.
    wrap
        Called once with the network on its device; returns the module used for the forward
        pass (``DistributedDataParallel`` in :mod:`srdvol.dask.ddp_train`). Default: none.
    """

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] | None = None


#: The place of a process that trains alone.
SINGLE_PROCESS = Rank()


class Trainer:
    """One optimiser step at a time on batches of raw patches; no file or store access.

    Parameters
    ----------
    network
        The bare SRDTrans network (moved to ``device`` here).
    options
        The run's options: ``sampling`` (spatial or temporal pairs), ``loss``, ``lr`` and
        ``steps`` (the schedule's peak and length), ``seed`` (the pair/augmentation stream, per
        rank).
    stats
        Global statistics; batches are normalised with them.
    device
        Torch device.
    place
        This process's :class:`Rank` in a distributed run.
    grad_clip
        Clip the global gradient norm to this value (``None``: no clipping).
    """

    def __init__(
        self,
        network: nn.Module,
        options: TrainOptions,
        *,
        stats: Statistics,
        device: torch.device | str = "cpu",
        place: Rank = SINGLE_PROCESS,
        grad_clip: float | None = GRAD_CLIP,
    ) -> None:
        sampling = options.sampling.value
        if sampling not in ("spatial", "temporal"):
            raise ConfigError(
                flag("sampling"), f"{sampling!r} is not spatial or temporal", "pick one"
            )
        self.device = torch.device(device)
        self.network = network.to(self.device)
        self.model = place.wrap(self.network) if place.wrap is not None else self.network
        self.stats = stats
        self.sampling = sampling
        self.loss_kind = options.loss.value
        self.steps = int(options.steps)
        self.rank = int(place.rank)
        self.world_size = int(place.world_size)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=options.lr, betas=BETAS)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps)
        )
        # Pair choices and augmentations come from a generator on the training device, seeded
        # per rank, so ranks draw different pairs and a run is reproducible.
        spawn = np.random.SeedSequence(options.seed, spawn_key=(self.rank, 1))
        self.generator = torch.Generator(device=self.device).manual_seed(
            int(spawn.generate_state(1)[0])
        )
        self.grad_clip = grad_clip
        self.last_grad_norm = math.nan
        self.step_count = 0

    def pairs(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Turn a normalised batch ``(B, t, y, x)`` into (input, target, ...) tensors.

        Spatial sampling gives (input, target_a, target_b), each ``(B, t, y/2, x/2)``; temporal
        sampling reads ``2 t`` frames and gives (input, target), each ``(B, t, y, x)``.
        """
        from srdvol.training.pairs import random_dihedral, spatial_pairs, temporal_pairs

        batch = random_dihedral(batch, generator=self.generator)
        if self.sampling == "spatial":
            return spatial_pairs(batch, generator=self.generator)
        return temporal_pairs(batch, generator=self.generator)

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """The self-supervised loss of the current network on a batch of raw patches."""
        from srdvol.training.pairs import pair_loss, spatial_loss

        x = torch.from_numpy(normalize(batch, self.stats)).to(self.device)
        inputs, *targets = self.pairs(x)
        prediction = self.model(inputs[:, None])[:, 0]
        if len(targets) == 2:
            return spatial_loss(prediction, *targets, kind=self.loss_kind)
        return pair_loss(prediction, targets[0], kind=self.loss_kind)

    def step(self, batch: np.ndarray) -> float:
        """Take one optimiser step on raw patches ``(B, t, y, x)``; return the loss."""
        self.model.train()
        # DDP syncs buffers in the forward pass and all-reduces gradients inside backward:
        # in a distributed run a failure there means a peer went away.
        synced = collective("a distributed training step") if self.world_size > 1 else nullcontext()
        with synced:
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
