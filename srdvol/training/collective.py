"""The few torch.distributed calls training makes, and what their failure means.

A collective fails when a peer went away (its process died, the network between workers broke,
a timeout): :func:`collective` turns such a failure into :class:`PeerLostError`, so callers tell
it apart from an error of the training code itself by its type. Gloo and NCCL raise plain
``RuntimeError`` for a lost peer; inside these calls that is what one means (running out of
memory keeps its own type).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["PeerLostError", "agree", "collective", "gather_objects"]


class PeerLostError(RuntimeError):
    """A collective call failed: another rank is gone or unreachable."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collective calls; their failure raises :class:`PeerLostError` naming ``what``."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TimeoutError, ConnectionError) as exc:
        if isinstance(exc, PeerLostError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PeerLostError(f"{what} failed: {first}") from exc


def agree(flag: bool, world_size: int, device: torch.device | str = "cpu") -> bool:
    """True on every rank when any rank says True (one small all-reduce; no-op for one rank)."""
    if world_size == 1:
        return bool(flag)
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    with collective("agreeing whether to stop"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's ``value``, in rank order (a collective call when ``world_size`` > 1)."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    with collective("gathering the ranks' random streams"):
        dist.all_gather_object(gathered, value)
    return gathered
