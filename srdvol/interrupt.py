"""Ctrl-C and SIGTERM: stop at a safe point, keep what is done, and say how to resume.

The command line runs every command inside :func:`handling`: SIGINT and SIGTERM then raise
:class:`Interrupted` (a :class:`KeyboardInterrupt` that remembers its signal, so the exit code
can be 130 or 143). Code that holds state it can save runs its loop inside :func:`deferred`:
there the first signal is only recorded, the loop checks :func:`requested` at its next safe point
(a finished training step), saves, and raises :func:`interruption`; a second signal raises at
once. Whatever a layer kept on the way out it adds as a note (:func:`keep`), and the command line
prints the notes in its one-line message.

Worker processes of srdvol's local clusters share the terminal's process group, so Ctrl-C reaches
them too; they :func:`install` the handler with ``raise_now=False``: the signal is recorded
(training ranks stop at the next step and save) and the worker stays up until the client closes
it, instead of dying with a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = [
    "Interrupted",
    "clear",
    "deferred",
    "exit_code",
    "handling",
    "install",
    "interruption",
    "keep",
    "kept",
    "requested",
    "signal_name",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM.

    Parameters
    ----------
    signum
        The signal that stopped it.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(signal_name(self.signum))


# Process-wide state; signal handlers run in the main thread between bytecodes.
_requested: int | None = None
_deferred = 0
_raise_now = True


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _requested
    first = _requested is None
    if first:
        _requested = signum  # the signal that asked first decides the exit code
    if not _raise_now:
        return  # a worker process: record only, the client decides
    if _deferred and first:
        return  # a loop in progress stops at its next safe point
    raise Interrupted(signum)


def install(*, raise_now: bool = True) -> dict[int, Any]:
    """Handle SIGINT and SIGTERM with srdvol's handler; return the previous handlers.

    A signal that this process inherited as ignored (``nohup``, a shell's ``cmd &``) stays
    ignored. Does nothing outside the main thread (signals can only be handled there).

    Parameters
    ----------
    raise_now
        True: raise :class:`Interrupted` (the command line). False: only record the request
        (worker processes).
    """
    global _raise_now
    if threading.current_thread() is not threading.main_thread():
        return {}
    _raise_now = raise_now
    previous: dict[int, Any] = {}
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, _on_signal)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers come back
    on exit (the command line wraps each command in this)."""
    global _raise_now
    before = _raise_now
    clear()
    previous = install(raise_now=True)
    try:
        yield
    finally:
        _restore(previous)
        _raise_now = before


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: the first SIGINT/SIGTERM only sets :func:`requested`; a second one raises.

    A request still pending when the outermost scope ends normally (the signal came during the
    last step) is raised there. In a plain Python session (no :func:`handling`), Python's own
    Ctrl-C handler is swapped for srdvol's while inside, so a training step is never cut in half.
    """
    global _deferred, _raise_now
    swapped: dict[int, Any] = {}
    raise_now = _raise_now
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        swapped[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
        _raise_now = True  # our handler stands in for Python's, which raises
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
        _restore(swapped)
        _raise_now = raise_now
    if _deferred == 0 and _raise_now and _requested is not None:
        raise interruption()


def requested() -> int | None:
    """The signal received since the last :func:`clear`, or None."""
    return _requested


def clear() -> None:
    """Forget a recorded signal (a new job starts)."""
    global _requested
    _requested = None


def interruption(note: str | None = None) -> Interrupted:
    """The exception to raise after stopping at a safe point, with ``note`` on what was kept.

    It consumes the request: a later loop in this process starts without one.
    """
    exc = Interrupted(_requested or signal.SIGINT)
    clear()
    if note:
        exc.add_note(note)
    return exc


def keep(exc: BaseException, note: str) -> None:
    """Record on ``exc`` what was kept (shown in the command line's message)."""
    exc.add_note(note)


def kept(exc: BaseException) -> list[str]:
    """What the layers recorded as kept on ``exc``, innermost first."""
    return list(getattr(exc, "__notes__", []))


def exit_code(exc: BaseException) -> int:
    """130 for SIGINT (or a plain KeyboardInterrupt), 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(signum: int) -> str:
    """``"SIGINT"``, ``"SIGTERM"``..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def resume_message(exc: BaseException, args: list[str]) -> str:
    """One line for the command line: which signal, what was kept, the command that resumes."""
    import shlex

    words = [a for a in args if a != "--debug"]
    command = next((a for a in words if not a.startswith("-")), "")
    if command == "train" and "--resume" not in words:
        words = [*words, "--resume"]
    again = shlex.join(["srdvol", *words])
    return (
        f"srdvol: interrupted by {signal_name(exit_code(exc) - 128)}: "
        f"{'; '.join(kept(exc)) or 'nothing was written yet'}; to resume, run: {again}"
    )
