"""srdvol's provenance record in an output's attributes, and the run id derived from it.

Every store srdvol writes carries, under the group attribute ``srdvol`` (beside the NGFF keys,
in both NGFF versions), the srdvol version, the input (path, level, channel), the output dtype
and NGFF version, the run's parameters, a ``run_id`` and the creation time. The run id is a hash
of the record, so the same command on the same input finds its own output and resumes it; an
output of another run is refused unless overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xarray as xr
import zarr

__all__ = [
    "PROVENANCE_KEY",
    "make_run_id",
    "new_record",
    "read_provenance",
    "record_differences",
    "simulation_record",
]

#: The group attribute that holds the record.
PROVENANCE_KEY = "srdvol"
#: Keys that differ between two creations of the same run; the run id ignores them.
_VOLATILE = ("run_id", "created")


def make_run_id(provenance: Mapping[str, Any]) -> str:
    """Deterministic run identifier: a short SHA-256 of the provenance's JSON.

    The same input, parameters and model give the same id, so a rerun of a killed command finds
    its own output and resumes it. Keys ``run_id`` and ``created`` are ignored.
    """
    content = {k: v for k, v in provenance.items() if k not in _VOLATILE}
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_differences(
    existing: Mapping[str, Any], wanted: Mapping[str, Any], *, limit: int = 3
) -> list[str]:
    """What sets two provenance records apart, for a message: ``"parameters.anchor=4.0 where
    this run has none"``.

    Entries are compared leaf by leaf (nested keys joined with dots); a key is compared only
    where its parent exists in both records, so a record holding fewer entries (a check made
    before training knows no prediction parameters yet) names only what it knows.
    ``run_id`` and ``created`` are ignored; at most ``limit`` differences are returned.
    """
    found: list[str] = []

    def walk(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> None:
        for key in sorted(set(old) | set(new)):
            if not prefix and (key in _VOLATILE or key not in old or key not in new):
                continue
            a, b = old.get(key), new.get(key)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                walk(a, b, f"{prefix}{key}.")
            elif a != b:
                found.append(f"{prefix}{key}={_shown(a)} where this run has {_shown(b)}")

    walk(existing, json.loads(json.dumps(dict(wanted), default=str)), "")
    return found[:limit]


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value, default=str)


def new_record(
    provenance: Mapping[str, Any], *, like: xr.DataArray, ngff: str, dtype: np.dtype[Any]
) -> dict[str, Any]:
    """The record an output gets: srdvol's version, the input and format, then ``provenance``.

    Parameters
    ----------
    provenance
        The run's own entries (command, parameters, model ...); a ``run_id`` given here is kept,
        otherwise one is derived with :func:`make_run_id`.
    like
        The input image (``attrs`` ``source``, ``level`` and ``channel`` are recorded).
    ngff, dtype
        The output's NGFF version and dtype.

    Returns
    -------
    dict
        JSON-compatible record, with ``run_id`` and ``created`` (UTC, seconds).
    """
    from srdvol import __version__

    record: dict[str, Any] = {
        "version": __version__,
        "input": like.attrs.get("source"),
        "input_level": like.attrs.get("level"),
        "input_channel": like.attrs.get("channel"),
        "dtype": str(dtype),
        "ngff": ngff,
    }
    record.update(json.loads(json.dumps(dict(provenance), default=str)))
    record["run_id"] = str(provenance.get("run_id") or make_run_id(record))
    record["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    return record


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``srdvol`` provenance attribute of an output, or ``None`` (not a srdvol output)."""
    try:
        group = zarr.open_group(os.fspath(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None
    value = group.attrs.get(PROVENANCE_KEY)
    return dict(value) if isinstance(value, dict) else None


def simulation_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``simulation`` record :func:`srdvol.simulate.scene.simulate` stored with a store.

    Returns
    -------
    dict or None
        The scene, noise model and seed of a simulated store (its provenance's ``simulation``
        entry); ``None`` for any other store.
    """
    found = (read_provenance(path) or {}).get("simulation")
    return dict(found) if isinstance(found, dict) else None
