"""Errors srdvol raises for bad input, bad configuration and unusable environments.

Every error message is one sentence in three parts: what (file or option), the problem and the
fix. Each class also inherits the builtin exception a Python user would catch for it, so
``except ValueError`` keeps working for library users. Only :mod:`srdvol.app.cli` turns these into
an exit code and a message without a traceback.

Messages name options by their parameter name, marked with :func:`flag` (``flag("patch")``):
``str(error)`` shows the name (``patch``), and the command line shows the flag (``--patch``,
:meth:`SrdvolError.command_line_message`), so library code never writes command-line syntax.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "ClusterError",
    "ConfigError",
    "DataError",
    "GPUUnavailableError",
    "InputError",
    "ModelMismatchError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputPathError",
    "RemoteStoreError",
    "SrdvolError",
    "StoreNotFoundError",
    "TrainingInterruptedError",
    "UnsupportedDtypeError",
    "as_flags",
    "flag",
]

_OPTION = re.compile(r"\[\[([A-Za-z_][A-Za-z0-9_]*)\]\]")


def flag(name: str) -> str:
    """Mark an option's parameter name inside a message (``"overwrite"``): shown as
    ``overwrite`` by ``str(error)`` and as ``--overwrite`` on the command line."""
    return f"[[{name}]]"


def as_flags(text: str) -> str:
    """Show the marked option names in ``text`` as command-line flags."""
    return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


def _as_names(text: str) -> str:
    return _OPTION.sub(lambda m: m.group(1), text)


def describe(subject: str | os.PathLike[str] | None, problem: str, fix: str) -> str:
    """Build the one-sentence message: ``"<subject>: <problem>; <fix>."``.

    Parameters
    ----------
    subject
        The file, store or option the message is about (``None`` to leave it out).
    problem
        What is wrong, in plain words.
    fix
        What the user should do about it.
    """
    head = f"{os.fspath(subject)}: " if subject is not None else ""
    text = f"{head}{problem.rstrip('.;')}; {fix.rstrip('.')}."
    return _as_names(text)


class SrdvolError(Exception):
    """Base class of every error srdvol reports to a user.

    Parameters
    ----------
    subject
        The file, store or option concerned.
    problem
        What is wrong.
    fix
        What to do about it.
    """

    exit_code: int = 2

    def __init__(self, subject: str | os.PathLike[str] | None, problem: str, fix: str) -> None:
        self.subject = None if subject is None else os.fspath(subject)
        self.problem = problem
        self.fix = fix
        super().__init__(describe(subject, problem, fix))

    def command_line_message(self) -> str:
        """The message with options shown as command-line flags (``--patch``)."""
        head = f"{self.subject}: " if self.subject is not None else ""
        return as_flags(f"{head}{self.problem.rstrip('.;')}; {self.fix.rstrip('.')}.")


class InputError(SrdvolError, ValueError):
    """The input store or array cannot be denoised as it is (axes, shape, metadata)."""


class StoreNotFoundError(SrdvolError, FileNotFoundError):
    """A path that should be a Zarr store (or model file) does not exist or is not one."""


class UnsupportedDtypeError(InputError, TypeError):
    """The array's dtype is not an integer or real floating-point type."""


class DataError(InputError):
    """The data itself is unusable (NaN or Inf values, constant image, too few frames)."""


class ConfigError(SrdvolError, ValueError):
    """An option or configuration-file value is invalid or inconsistent with another."""


class OutputPathError(SrdvolError, ValueError):
    """The output path is unusable (inside the input, same as the input, not writable)."""


class OutputExistsError(SrdvolError, FileExistsError):
    """The output exists and does not belong to this run."""


class OutputLockedError(SrdvolError, RuntimeError):
    """Another srdvol run holds the output (its lock file names the host, pid and start time)."""


class ModelMismatchError(SrdvolError, ValueError):
    """A model file does not fit the requested configuration (patch size, network, version)."""


class ClusterError(SrdvolError, ConnectionError):
    """The Dask scheduler cannot be reached or the cluster cannot be started."""


class RemoteStoreError(SrdvolError, OSError):
    """A remote store (``s3://`` ...) cannot be reached, or the credentials are missing or may
    not do what srdvol needs (a missing bucket is a :class:`StoreNotFoundError`)."""


class GPUUnavailableError(SrdvolError, RuntimeError):
    """GPUs were requested but are not present or not visible."""


class TrainingInterruptedError(SrdvolError, RuntimeError):
    """Distributed training stopped: a worker died or lost contact with the others mid-run."""


def _rebuild_error(
    cls: type[SrdvolError], subject: str | None, problem: str, fix: str
) -> SrdvolError:
    return cls(subject, problem, fix)


def _reduce_error(self: SrdvolError) -> tuple[object, ...]:
    # Errors raised inside Dask tasks are pickled back to the client; the default reduction
    # would call __init__ with the message alone and fail.
    return (_rebuild_error, (type(self), self.subject, self.problem, self.fix), self.__dict__)


SrdvolError.__reduce__ = _reduce_error  # type: ignore[method-assign,assignment]
