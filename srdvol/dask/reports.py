"""Patches predicted inside running blocks: progress while a long block runs.

A block can run for minutes on a GPU. It counts the patches it has predicted
(:func:`count_patches`, tagged with the name of the denoised array) and, at most every
:data:`PATCH_REPORT_EVERY` seconds per process, reports them: as a Dask event on a worker, or to
the writer's callback when the block runs in the writer's own process. :func:`patch_reports`
subscribes the writer for the duration of a write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["PATCH_REPORT_EVERY", "PATCH_TOPIC", "count_patches", "patch_reports"]

#: Event topic on which workers report the patches they predicted.
PATCH_TOPIC = "srdvol-patches"
#: Least seconds between two patch reports of one process.
PATCH_REPORT_EVERY = 1.0

_lock = threading.Lock()
_pending: dict[str, int] = {}
_sent = 0.0
#: (array name, callback) of the in-process write that listens, if any.
_sink: tuple[str, Callable[[int], None]] | None = None


def count_patches(tag: str, n: int) -> None:
    """Record that a block of the array named ``tag`` predicted ``n`` more patches."""
    global _sent
    with _lock:
        _pending[tag] = _pending.get(tag, 0) + int(n)
        now = time.monotonic()
        if now - _sent < PATCH_REPORT_EVERY:
            return
        _sent = now
        batch = dict(_pending)
        _pending.clear()
    _send(batch)


def _send(batch: dict[str, int]) -> None:
    sink = _sink
    if sink is not None and sink[0] in batch:
        sink[1](batch.pop(sink[0]))
    if not batch:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a worker
        return
    for name, n in batch.items():
        worker.log_event(PATCH_TOPIC, {"array": name, "patches": n})


@contextmanager
def patch_reports(client: Any, name: str, on_patches: Callable[[int], None]) -> Iterator[None]:
    """Call ``on_patches(n)`` while blocks of the array ``name`` report predicted patches.

    Parameters
    ----------
    client
        A ``distributed.Client`` whose workers run the blocks, or None for this process.
    name
        The denoised array's name (its dask name).
    on_patches
        Receives the number of newly predicted patches.
    """
    global _sink

    def from_worker(event: Any) -> None:
        msg = event[1]
        if isinstance(msg, dict) and msg.get("array") == name:
            on_patches(int(msg.get("patches", 0)))

    if client is not None:
        client.subscribe_topic(PATCH_TOPIC, from_worker)
    else:
        with _lock:
            _pending.pop(name, None)  # left over from an earlier in-process write
        _sink = (name, on_patches)
    try:
        yield
    finally:
        if client is not None:
            with suppress(Exception):
                client.unsubscribe_topic(PATCH_TOPIC)
        else:
            _sink = None
