"""The resume ledger: which blocks of a run are written, in one small file beside the output.

The writer records each block whose output is stored; a rerun of the same run skips them. The
file is a bitmap (1e5 blocks take 12.5 kB) written by the client only, replaced atomically.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from srdvol.errors import OutputExistsError, flag

__all__ = ["Ledger"]


class Ledger:
    """Which blocks of a run are finished: a bitmap in one small JSON file, written by the client.

    1e5 blocks take 12.5 kB. The file is replaced atomically (temporary file + rename on local
    disks; a single PUT through fsspec for URLs), at most every ``interval`` seconds, so a kill
    loses at most the last few records (those blocks are simply computed again).

    Parameters
    ----------
    path
        Local path or fsspec URL of the ledger file (e.g. ``out.zarr/srdvol_ledger.json``).
    nblocks
        Block grid shape.
    fingerprint
        What identifies the run (shape, block chunks, run id); a ledger with another fingerprint
        raises :class:`~srdvol.errors.OutputExistsError`.
    interval
        Seconds between writes of the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        nblocks: Sequence[int],
        fingerprint: Mapping[str, Any],
        interval: float = 2.0,
    ) -> None:
        self.path = os.fspath(path)
        self.nblocks = tuple(int(n) for n in nblocks)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
        self.interval = float(interval)
        self._done = np.zeros(math.prod(self.nblocks), dtype=bool)
        self._last = 0.0
        self._dirty = False
        text = _read_text(self.path)
        if text is not None:
            stored = json.loads(text)
            if stored.get("fingerprint") != self.fingerprint or stored.get("grid") != list(
                self.nblocks
            ):
                raise OutputExistsError(
                    self.path,
                    "this ledger belongs to a run with other parameters (shape, blocks or run id)",
                    f"rerun with the same {_recorded_blocks(stored)}model, or pass "
                    f"{flag('overwrite')} to start again",
                )
            bits = np.frombuffer(zlib.decompress(base64.b64decode(stored["done"])), dtype=np.uint8)
            self._done[:] = np.unpackbits(bits, count=self._done.size).astype(bool)

    def is_done(self, flat: int) -> bool:
        """Whether block number ``flat`` (C order over the grid) is finished."""
        return bool(self._done[flat])

    @property
    def count(self) -> int:
        """Number of finished blocks."""
        return int(self._done.sum())

    def mark(self, flat: int) -> None:
        """Record block ``flat`` as finished (written to the file by :meth:`flush`)."""
        self._done[flat] = True
        self._dirty = True
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write the ledger file now if anything changed."""
        if not self._dirty and self._last:
            return
        bits = base64.b64encode(zlib.compress(np.packbits(self._done).tobytes())).decode()
        payload = json.dumps(
            {
                "version": 1,
                "grid": list(self.nblocks),
                "fingerprint": self.fingerprint,
                "done": bits,
            }
        )
        _write_text(self.path, payload)
        self._dirty = False
        self._last = time.monotonic()


def _is_url(path: str) -> bool:
    return "://" in path


def _read_text(path: str) -> str | None:
    if _is_url(path):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(path)
        if not fs.exists(inner):
            return None
        with fs.open(inner, "rt") as f:
            return f.read()
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write_text(path: str, text: str) -> None:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "wt") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _recorded_blocks(stored: Mapping[str, Any]) -> str:
    # The default blocks follow the workers' memory: name the ones recorded, for --block.
    chunks = stored.get("fingerprint", {}).get("chunks")
    try:
        shape = tuple(int(c[0]) for c in chunks)
    except (TypeError, ValueError, IndexError):
        return f"{flag('block')} and "
    return f"{flag('block')} (the run used blocks of {shape} in array order) and "
