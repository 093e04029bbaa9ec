"""A lazy array's graph cut into blocks: what each block computes, and what its neighbours share.

Neighbouring blocks share tasks: a block's halo is the low edge of its neighbours' input blocks,
and its sums spill into them. :class:`BlockUnits` finds, when a block is submitted, which of its
new tasks a later neighbour will need, so that a runner (:mod:`srdvol.dask.runners`) keeps their
results until that neighbour is submitted (no input read twice, no patch predicted twice).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np
from dask._task_spec import GraphNode, convert_legacy_graph
from dask.highlevelgraph import HighLevelGraph

__all__ = ["BlockUnits", "Key", "tasks_per_block"]

Key = Hashable


class BlockUnits:
    """The tasks of each block of a lazy array and what a block leaves for later blocks.

    Parameters
    ----------
    data
        The lazy dask array; one block = one chunk.
    eager_prefix
        Tasks in layers whose name starts with this are part of the block whose index their key
        starts with, although that block's own output does not need them (a block's spills:
        computed with it, so a neighbour waits for a slice of its sums, not for all of them).
    """

    def __init__(self, data: Any, *, eager_prefix: str = "") -> None:
        self.name = data.name
        self.grid = tuple(data.numblocks)
        graph = data.__dask_graph__()
        if not isinstance(graph, HighLevelGraph):
            graph = HighLevelGraph.from_collections(self.name, dict(graph), dependencies=())
        self._graph = graph
        self._position: dict[int, int] = {}
        self._eager: dict[tuple[int, ...], list[Key]] = defaultdict(list)
        if eager_prefix:
            for layer_name, layer in graph.layers.items():
                if str(layer_name).startswith(eager_prefix):
                    for key in layer:
                        self._eager[tuple(key[1 : 1 + len(self.grid)])].append(key)
        self._units: dict[int, dict[Key, GraphNode]] = {}
        self._roots: dict[int, list[Key]] = {}
        self._submitted: set[int] = set()
        self.coupled = self._coupled_axes()

    def index(self, flat: int) -> tuple[int, ...]:
        """Grid index of block number ``flat``."""
        return tuple(int(i) for i in np.unravel_index(flat, self.grid))

    def output_key(self, flat: int) -> tuple[Any, ...]:
        """Key of the block's chunk of the lazy array."""
        return (self.name, *self.index(flat))

    def roots(self, flat: int) -> list[Key]:
        """The block's output key and the eager tasks that belong to it."""
        if flat not in self._roots:
            index = self.index(flat)
            self._roots[flat] = [self.output_key(flat), *self._eager.get(index, [])]
        return self._roots[flat]

    def unit(self, flat: int) -> dict[Key, GraphNode]:
        """Every task the block needs (its whole dependency closure), by key."""
        if flat not in self._units:
            roots = self.roots(flat)
            culled = convert_legacy_graph(dict(self._graph.cull(set(roots))))
            # HighLevelGraph.cull may keep more of a layer than the roots need (it kept another
            # plane's spill): walk the dependencies, or every axis would look coupled.
            unit: dict[Key, GraphNode] = {}
            stack = list(roots)
            while stack:
                key = stack.pop()
                if key not in unit:
                    unit[key] = culled[key]
                    stack.extend(unit[key].dependencies)
            self._units[flat] = unit
        return self._units[flat]

    def _coupled_axes(self) -> list[int]:
        # The axes along which neighbouring blocks share tasks (halos, spills), from the first
        # block and its next neighbour; the others (c, z planes) are independent.
        first = self.unit(0)
        coupled = []
        for axis, n in enumerate(self.grid):
            if n < 2:
                continue
            step = [0] * len(self.grid)
            step[axis] = 1
            other = int(np.ravel_multi_index(step, self.grid))
            # Chunks of an array (tuple keys) couple blocks; a graph-wide constant such as
            # from_zarr's "original-..." array handle (a string key) is every block's and
            # couples nothing.
            shared = first.keys() & self.unit(other).keys()
            if any(isinstance(key, tuple) for key in shared):
                coupled.append(axis)
        self._units.clear()
        return coupled

    def order(self, todo: Iterable[int]) -> list[int]:
        """Sort ``todo`` into the submission order (and remember it): independent axes outermost,
        then the coupled axes in array order (t before y, x), so that what waits for later
        blocks is one layer of the grid."""
        axes = [a for a in range(len(self.grid)) if a not in self.coupled] + self.coupled
        ordered = sorted(todo, key=lambda flat: tuple(self.index(flat)[a] for a in axes))
        self._position = {flat: i for i, flat in enumerate(ordered)}
        return ordered

    def _neighbours(self, flat: int) -> list[int]:
        """Grid neighbours (one step along any coupled axes) that are still to be submitted."""
        index = self.index(flat)
        out = []
        for step in itertools.product((-1, 0, 1), repeat=len(self.coupled)):
            if not any(step):
                continue
            other = list(index)
            for axis, s in zip(self.coupled, step, strict=True):
                other[axis] += s
            if not all(0 <= i < n for i, n in zip(other, self.grid, strict=True)):
                continue
            neighbour = int(np.ravel_multi_index(other, self.grid))
            if neighbour in self._position and neighbour not in self._submitted:
                out.append(neighbour)
        return out

    def _walk(self, flat: int, stop: Callable[[Key], bool]) -> tuple[set[Key], set[Key]]:
        """Keys of the block's unit reached from its roots, and the stop keys met on the way."""
        unit = self.unit(flat)
        reached: set[Key] = set()
        stopped: set[Key] = set()
        stack = list(self.roots(flat))
        while stack:
            key = stack.pop()
            if key in reached or key in stopped:
                continue
            if stop(key):
                stopped.add(key)
                continue
            reached.add(key)
            stack.extend(unit[key].dependencies)
        return reached, stopped

    def plan(
        self, flat: int, available: Mapping[Key, Any]
    ) -> tuple[dict[Key, GraphNode], set[Key], dict[Key, set[int]]]:
        """What submitting block ``flat`` takes, given the results kept so far.

        Returns
        -------
        new
            The tasks to submit: the block's unit up to the kept results.
        uses
            Kept results the block reads.
        hold
            New tasks and kept results that later neighbours need directly, with those
            neighbours (a result can be shared by blocks two apart, through the one between).
        """
        reached, uses = self._walk(flat, available.__contains__)
        unit = self.unit(flat)
        new = {key: unit[key] for key in reached}
        self._submitted.add(flat)
        here = self._position[flat]
        hold: dict[Key, set[int]] = defaultdict(set)
        for neighbour in self._neighbours(flat):
            there = self._position[neighbour]
            if there < here or self.unit(neighbour).keys().isdisjoint(new):
                continue
            # What the blocks submitted between this one and the neighbour compute, they keep
            # for it themselves: its walk stops there too.
            between: set[Key] = set()
            for other in self._neighbours(neighbour):
                if here < self._position[other] < there:
                    between.update(self.unit(other).keys())
            stops = new.keys() | available.keys() | between
            _, needed = self._walk(neighbour, stops.__contains__)
            for key in needed:
                if key in new or key in available:  # kept already: keep it for this one too
                    hold[key].add(neighbour)
        self._units.pop(flat, None)
        return new, uses, dict(hold)


def tasks_per_block(units: BlockUnits) -> int:
    """Tasks of the first block's unit (plus its store): a measure for how many fit at once."""
    return len(units.unit(0)) + 1
