"""Running a lazy array block by block, computing every task once.

The writer submits the blocks of a lazy array one at a time, in a fixed order, with a bounded
number in flight. The runner keeps the results a later neighbour will need
(:class:`~srdvol.dask.units.BlockUnits` says which) until that neighbour is submitted;
everything else is freed as soon as its block is written. Memory is bounded by the
blocks in flight plus one layer of the grid (what waits for the next row of blocks).

Two runners execute the tasks: :class:`LocalRunner` (threads of this process) and
:class:`DistributedRunner` (a ``distributed.Client``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

from dask._task_spec import GraphNode, Task

from srdvol.dask.units import BlockUnits, Key

__all__ = ["DistributedRunner", "LocalRunner", "run_blocks"]


class LocalRunner:
    """Runs tasks in a thread pool of this process as their inputs become ready.

    Results are kept while a submitted task still needs them or the caller holds them (every
    key it asked for, until :meth:`release`); ready tasks of earlier blocks run first.

    Parameters
    ----------
    threads
        Pool threads.
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="srdvol")
        self._lock = threading.Lock()
        self._nodes: dict[Key, GraphNode] = {}
        self._results: dict[Key, Any] = {}
        self._errors: dict[Key, BaseException] = {}
        self._missing: dict[Key, set[Key]] = {}
        self._dependents: dict[Key, set[Key]] = defaultdict(set)
        self._readers: dict[Key, int] = defaultdict(int)
        self._holds: dict[Key, int] = defaultdict(int)
        self._futures: dict[Key, list[Future[Any]]] = defaultdict(list)
        self._priority: dict[Key, int] = {}
        self._ready: list[tuple[int, int, Key]] = []
        self._seq = itertools.count()
        self._stopped = False

    def submit(
        self, graph: Mapping[Key, GraphNode], want: Sequence[Key], priority: int
    ) -> dict[Key, Future[Any]]:
        """Add tasks (those already known are skipped) and return futures for ``want``."""
        with self._lock:
            fresh = [
                k
                for k in graph
                if k not in self._nodes and k not in self._results and k not in self._errors
            ]
            for key in fresh:
                self._nodes[key] = graph[key]
                self._priority[key] = priority
            failed: list[tuple[Key, BaseException]] = []
            for key in fresh:
                missing = set()
                for dep in graph[key].dependencies:
                    self._readers[dep] += 1
                    if dep in self._errors:
                        failed.append((key, self._errors[dep]))
                    elif dep not in self._results:
                        if dep not in self._nodes:
                            raise RuntimeError(f"task {key!r} needs {dep!r}, which nobody computes")
                        missing.add(dep)
                        self._dependents[dep].add(key)
                self._missing[key] = missing
            handles = {}
            for key in want:
                future: Future[Any] = Future()
                self._holds[key] += 1
                if key in self._results:
                    future.set_result(self._results[key])
                elif key in self._errors:
                    future.set_exception(self._errors[key])
                else:
                    self._futures[key].append(future)
                handles[key] = future
            for key, exc in failed:
                self._fail(key, exc)
            for key in fresh:
                if key in self._nodes and not self._missing[key]:
                    self._push(key)
        return handles

    def _push(self, key: Key) -> None:
        heapq.heappush(self._ready, (self._priority[key], next(self._seq), key))
        self._pool.submit(self._work)

    def _work(self) -> None:
        with self._lock:
            if self._stopped or not self._ready:
                return
            _, _, key = heapq.heappop(self._ready)
            node = self._nodes[key]
            values = {dep: self._results[dep] for dep in node.dependencies}
        try:
            value = node(values)
        except BaseException as exc:  # handed to whoever waits for the result
            with self._lock:
                self._fail(key, exc)
            return
        with self._lock:
            self._done(key, value)

    def _done(self, key: Key, value: Any) -> None:
        node = self._nodes.pop(key)
        self._missing.pop(key, None)
        self._results[key] = value
        for future in self._futures.pop(key, []):
            future.set_result(value)
        for dependent in self._dependents.pop(key, set()):
            waiting = self._missing.get(dependent)
            if waiting is not None:
                waiting.discard(key)
                if not waiting and not self._stopped:
                    self._push(dependent)
        for dep in node.dependencies:
            self._readers[dep] -= 1
            self._maybe_drop(dep)
        self._maybe_drop(key)

    def _fail(self, key: Key, exc: BaseException) -> None:
        node = self._nodes.pop(key, None)
        self._missing.pop(key, None)
        self._errors[key] = exc
        for future in self._futures.pop(key, []):
            future.set_exception(exc)
        if node is not None:
            for dep in node.dependencies:
                self._readers[dep] -= 1
                self._maybe_drop(dep)
        for dependent in self._dependents.pop(key, set()):
            if dependent in self._nodes:
                self._fail(dependent, exc)

    def _maybe_drop(self, key: Key) -> None:
        if key in self._results and self._readers.get(key, 0) <= 0 and not self._holds.get(key):
            del self._results[key]
            self._readers.pop(key, None)
            self._holds.pop(key, None)
            self._priority.pop(key, None)

    @property
    def held(self) -> int:
        """Results this runner holds now (for tests and diagnostics)."""
        with self._lock:
            return len(self._results)

    def release(self, key: Key) -> None:
        """The caller no longer needs ``key`` (one of the keys it asked for)."""
        with self._lock:
            self._holds[key] -= 1
            self._maybe_drop(key)

    @staticmethod
    def wait(handles: Sequence[Future[Any]]) -> list[Future[Any]]:
        """Block until at least one of ``handles`` is done; return the done ones."""
        done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
        return list(done)

    @staticmethod
    def result(handle: Future[Any]) -> Any:
        """The value of a done handle (raises its task's error)."""
        return handle.result()

    def cancel(self) -> None:
        """Start nothing more; tasks already running end on their own."""
        with self._lock:
            self._stopped = True
            self._ready.clear()
            for futures in self._futures.values():
                for future in futures:
                    future.cancel()

    def close(self) -> None:
        """Wait for running tasks and free the pool."""
        self.cancel()
        self._pool.shutdown(wait=True)


class DistributedRunner:
    """Submits tasks to a ``distributed`` cluster; keeps futures for the keys asked for.

    A later graph that names a kept key as a dependency reuses its result on the cluster (and a
    task resubmitted under a key the scheduler still has is not computed again).
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._kept: dict[Key, Any] = {}
        # Finished futures are announced here (one callback per future): waiting on a queue
        # leaves Ctrl-C to the main thread, where distributed.wait's event-loop call would
        # take it mid-callback and log a NameError from distributed's own cancel path.
        self._finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._watched: set[Any] = set()

    def submit(
        self, graph: Mapping[Key, GraphNode], want: Sequence[Key], priority: int
    ) -> dict[Key, Any]:
        """Send the tasks; return futures for ``want`` (earlier blocks get higher priority)."""
        futures = self.client.get(dict(graph), list(want), sync=False, priority=-priority)
        handles = dict(zip(want, futures, strict=True))
        self._kept.update(handles)
        return handles

    def release(self, key: Key) -> None:
        """Drop the future for ``key`` (the scheduler frees it once no task needs it)."""
        future = self._kept.pop(key, None)
        if future is not None:
            future.release()

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        """Block until at least one of ``handles`` is done; return the done ones."""
        for handle in handles:
            if handle.key not in self._watched:
                self._watched.add(handle.key)
                handle.add_done_callback(self._finished.put)
        while True:
            done = [handle for handle in handles if handle.done()]
            if done:
                self._watched.difference_update(handle.key for handle in done)
                return done
            with contextlib.suppress(queue.Empty):
                self._finished.get(timeout=1.0)

    @staticmethod
    def result(handle: Any) -> Any:
        """The value of a done future (raises its task's error)."""
        return handle.result()

    def cancel(self) -> None:
        """Cancel everything still pending."""
        pending = [f for f in self._kept.values() if not f.done()]
        if pending:
            self.client.cancel(pending)

    def close(self) -> None:
        """Drop every kept future."""
        for key in list(self._kept):
            self.release(key)


def run_blocks(
    units: BlockUnits,
    runner: LocalRunner | DistributedRunner,
    order: Sequence[int],
    *,
    store: Callable[[int, GraphNode | None], tuple[Key, GraphNode]],
    finished: Callable[[int, Any], None],
    wave: int,
) -> int:
    """Submit the blocks of ``order``, at most ``wave`` unfinished at once, and report each.

    Parameters
    ----------
    units
        The lazy array's blocks.
    runner
        Where tasks run.
    order
        Flat block numbers, in submission order.
    store
        Builds the task that stores block ``flat`` (its key and node), given the task that
        computes the block to run inline (None: refer to the block's key); its result is
        passed to ``finished``.
    finished
        Called with the block number and its store task's result as each block is stored.
    wave
        Most blocks submitted and not yet stored.

    Returns
    -------
    int
        The most blocks that were in flight at once.
    """
    kept: dict[Key, Any] = {}
    waiting_for: dict[Key, set[int]] = {}
    kept_for: dict[int, set[Key]] = defaultdict(set)
    pending: dict[Any, tuple[int, Key]] = {}
    blocks = iter(enumerate(order))
    more, peak = True, 0
    try:
        while True:
            while more and len(pending) < max(1, wave):
                position, flat = next(blocks, (-1, -1))
                if flat < 0:
                    more = False
                    break
                new, _, hold = units.plan(flat, kept)
                # The block's output is computed inside its store task: stored where it is
                # made, never sent to another worker (nothing else reads it).
                out = units.output_key(flat)
                inline = isinstance(new.get(out), Task) and out not in hold
                key, node = store(flat, new.pop(out) if inline else None)
                new[key] = node
                handles = runner.submit(new, [key, *(k for k in hold if k not in kept)], position)
                for held, neighbours in hold.items():
                    if held not in kept:
                        kept[held] = handles[held]
                    waiting_for.setdefault(held, set()).update(neighbours)
                    for neighbour in neighbours:
                        kept_for[neighbour].add(held)
                # This block's graph now names what it reads: the runner keeps those for it.
                for held in kept_for.pop(flat, set()):
                    waiting = waiting_for.get(held)
                    if waiting is not None:
                        waiting.discard(flat)
                        if not waiting:
                            del waiting_for[held]
                            kept.pop(held, None)
                            runner.release(held)
                pending[handles[key]] = (flat, key)
                peak = max(peak, len(pending))
            if not pending:
                return peak
            for handle in runner.wait(list(pending)):
                flat, key = pending.pop(handle)
                value = runner.result(handle)
                runner.release(key)
                finished(flat, value)
    except BaseException:
        runner.cancel()
        raise
    finally:
        for held in list(kept):
            runner.release(held)
