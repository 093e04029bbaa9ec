"""One run at a time per output: a lock file next to it, naming the host, pid and start time.

``hold(out)`` creates ``OUT.srdvol-lock`` (beside the output, so that ``--overwrite`` replacing
the output never removes its own lock) and removes it when the run ends, whatever the ending.
A second run on the same output finds the lock and stops with one sentence saying who holds it.

- **Local paths**: the lock file is written in full under a temporary name and then
  hard-linked to its final name; ``link`` fails if the name exists, so creation is atomic (also
  on NFS, where this is the classic locking idiom). File systems without hard links fall back
  to ``O_CREAT | O_EXCL``.
- **Stale locks**: a lock from this host whose pid no longer runs (or now belongs to a process
  started later than the one recorded, i.e. a reused pid) is taken over with a note. A lock
  from another host cannot be checked from here; the message says how to remove it.
- **fsspec URLs** (``s3://``, ``memory://`` ...): object stores have no create-if-absent that
  fsspec exposes everywhere, so the lock is checked, written, and read back after a short pause;
  a run that finds another run's token there backs off. Two runs starting within that pause can
  both proceed; the block ledger then keeps their writes consistent (each block is written
  whole by whichever finishes it), they only duplicate work.
- The lock is re-entrant within one process (``denoise`` holds the output through training and
  prediction, and prediction takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from srdvol.errors import OutputLockedError, OutputPathError

__all__ = ["LOCK_SUFFIX", "hold", "lock_path", "read_lock"]

#: The lock file is ``OUT`` + this suffix.
LOCK_SUFFIX = ".srdvol-lock"
#: Seconds a URL lock is left before it is read back (see the module docstring).
URL_SETTLE = 0.5

_HELD: dict[str, list[Any]] = {}  # lock path -> [token, depth]
_HELD_LOCK = threading.Lock()


def lock_path(out: str | os.PathLike[str]) -> str:
    """The lock file of an output: ``OUT.srdvol-lock`` next to it."""
    text = os.fspath(out).rstrip("/")
    return text + LOCK_SUFFIX if "://" in text else os.path.abspath(text) + LOCK_SUFFIX


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _iso(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _record(token: str) -> dict[str, Any]:
    import sys

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_started": _process_start(pid),
        "started": _iso(time.time()),
        "command": " ".join(["srdvol", *sys.argv[1:]])[:500],
        "token": token,
    }


def read_lock(path: str) -> dict[str, Any] | None:
    """The content of a lock file (``{}`` if unreadable or empty), or ``None`` if absent."""
    try:
        text = _read(path)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock of this host whose process is gone (or whose pid was reused since)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    started = _process_start(pid)
    if started is None:
        return True
    recorded = holder.get("process_started")
    return isinstance(recorded, int | float) and abs(started - recorded) > 1.0


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}"
    )


@contextmanager
def hold(
    out: str | os.PathLike[str],
    *,
    note: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Hold the lock of an output for the duration of the ``with`` block.

    Parameters
    ----------
    out
        The output image (local path or fsspec URL).
    note
        Called with a one-line note when a stale lock is taken over.

    Yields
    ------
    str
        The lock file's path.

    Raises
    ------
    OutputLockedError
        If another live run holds the output (the message names its pid, host and start).
    OutputPathError
        If the lock file cannot be written (read-only or permission denied).
    """
    path = lock_path(out)
    with _HELD_LOCK:
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield path
        finally:
            with _HELD_LOCK:
                held[1] -= 1
        return
    token = uuid.uuid4().hex
    created = _acquire(path, out=os.fspath(out), token=token, note=note)
    with _HELD_LOCK:
        _HELD[path] = [token, 1]
    ended = False
    try:
        yield path
        ended = True
    finally:
        with _HELD_LOCK:
            del _HELD[path]
        try:
            _release(path, token, created)
        except Exception as exc:
            # A store that went away (or turned read-only) mid-run: the run's own error, already
            # on its way, says so; a lock left behind by this host's finished process is taken
            # over by the next run.
            if ended and note is not None:
                note(
                    f"srdvol: note: {os.fspath(out)}: the lock file {path} could not be removed "
                    f"({type(exc).__name__}: {exc}); the next run takes it over"
                )


def _acquire(path: str, *, out: str, token: str, note: Callable[[str], None] | None) -> list[str]:
    """Create the lock (taking over a stale one); return the folders created for it."""
    record = _record(token)
    created = _make_parents(path, out)
    for _ in range(3):
        try:
            if _create(path, record):
                return created
        except OSError as exc:
            _remove_folders(created)
            raise OutputPathError(
                out,
                f"the lock file {path} cannot be written ({exc.strerror or exc})",
                "choose a writable output location",
            ) from None
        holder = read_lock(path)
        if holder is None:
            continue  # released meanwhile: try again
        if _is_stale(holder):
            _remove(path)
            if note is not None:
                note(
                    f"srdvol: note: {out}: took over the lock of a run that is no longer "
                    f"running ({_describe(holder)})"
                )
            continue
        _remove_folders(created)
        if holder.get("token") == token:  # pragma: no cover - our own lock, written twice
            return created
        raise OutputLockedError(
            out,
            f"another srdvol run holds this output ({_describe(holder)}; lock file {path})",
            "wait for that run to finish, or if it is no longer running, delete the lock file "
            "and run again",
        )
    _remove_folders(created)
    raise OutputLockedError(
        out,
        f"the lock file {path} kept changing while srdvol tried to take it",
        "make sure no other srdvol run writes this output, then run again",
    )


def _create(path: str, record: dict[str, Any]) -> bool:
    """Create the lock file with ``record`` unless it exists; True when this call created it."""
    text = json.dumps(record)
    if "://" in path:
        return _create_url(path, text, record["token"])
    folder = os.path.dirname(path)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{record['token']}")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system
        return _create_exclusive(path, text)
    finally:
        os.remove(temporary)


def _create_exclusive(path: str, text: str) -> bool:
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def _create_url(path: str, text: str, token: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        return False
    fs.pipe_file(root, text.encode())
    time.sleep(URL_SETTLE)
    holder = read_lock(path) or {}
    return holder.get("token") == token


def _read(path: str) -> str:
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        if not fs.exists(root):
            raise FileNotFoundError(path)
        return bytes(fs.cat_file(root)).decode("utf-8", errors="replace")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _remove(path: str) -> None:
    try:
        if "://" in path:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path)
            fs.rm_file(root)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def _release(path: str, token: str, created: list[str]) -> None:
    """Remove the lock if it is still ours (never another run's after a takeover)."""
    holder = read_lock(path)
    if holder is not None and holder.get("token") == token:
        _remove(path)
    _remove_folders(created)


def _make_parents(path: str, out: str) -> list[str]:
    """Create the lock's missing parent folders; return them, deepest first."""
    if "://" in path:
        return []
    created: list[str] = []
    folder = os.path.dirname(path)
    while not os.path.isdir(folder):
        created.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for folder in reversed(created):
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_folders(created)
            raise OutputPathError(
                out,
                f"the folder {folder} cannot be created ({exc.strerror or exc})",
                "choose a writable output location",
            ) from None
    return created


def _remove_folders(folders: list[str]) -> None:
    """Remove folders this lock created, if they are still empty (the output may fill them)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return
