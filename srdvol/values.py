"""The value types of options and their one check each: a patch or block (:class:`Patch`), an
overlap, a patch that fits the network, a GPU choice. :mod:`srdvol.options` builds the option
groups from them; library code that takes raw values checks them here too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from srdvol.errors import ConfigError, flag

__all__ = [
    "DEFAULT_ANCHOR",
    "DEFAULT_COMPRESSION",
    "DEFAULT_LICENSE",
    "DEFAULT_OVERLAP",
    "DEVICE_PREFIXES",
    "FRAMES_PER_LEVEL",
    "GUIDED_ANCHOR",
    "MAX_OVERLAP",
    "Block",
    "GPUChoice",
    "Patch",
    "Span",
    "Window",
    "check_model_patch_t",
    "check_overlap",
    "default_anchor",
    "parse_compression",
    "parse_gpus",
    "parse_triple",
]

#: Gaussian sigma (pixels) above which the output keeps the input's own intensities
#: (``--anchor``, :mod:`srdvol.predict.anchor`): unbiased cell traces at short training budgets
#: (benchmarks/RESULTS.md, issue 13).
DEFAULT_ANCHOR = 4.0
#: The anchor's sigma with ``--guide``, where its correction is shaped like the mean image
#: (:func:`srdvol.predict.anchor.shape_of`) and so noisier on a cell's pixels: at 4.5 pixels the
#: transients keep their amplitude and pixel traces beat every Gaussian's (benchmarks/RESULTS.md).
GUIDED_ANCHOR = 4.5
#: Patch overlap of prediction: every voxel is covered by about 2.4 patches at 0.25.
DEFAULT_OVERLAP = 0.25
#: Above this the stride is 5 % of the patch and a run costs tens of times more (`srdvol info`).
MAX_OVERLAP = 0.95
#: blosc-zstd level of the output: fast to write, and denoised float32 data still compresses
#: about 1.5x (``srdvol info`` estimates the stored size).
DEFAULT_COMPRESSION = 3
#: Licence of an exported model's weights unless the user names another (SPDX).
DEFAULT_LICENSE = "CC-BY-4.0"
#: patch_t is a multiple of this: the network halves t four times.
FRAMES_PER_LEVEL = 16


class Window(StrEnum):
    """Blending window across a patch: linear tent or cos² (Hann)."""

    TENT = "tent"
    COS2 = "cos2"


class Patch(NamedTuple):
    """A patch (or any per-axis size) along t, y and x.

    A tuple, so it unpacks, indexes and pickles like ``(t, y, x)``; :meth:`parse` reads every
    form users write (``"32,64,64"``, a sequence, a mapping by axis name).
    """

    t: int
    y: int
    x: int

    @classmethod
    def parse(cls, value: Any, *, name: str = "patch") -> Patch:
        """Read ``"32,64,64"``, ``(32, 64, 64)`` or ``{"t": 32, "y": 64, "x": 64}``.

        Raises
        ------
        ConfigError
            Unless there are exactly three positive integers; the error names ``name``.
        """
        if isinstance(value, cls):
            return value
        return cls(*parse_triple(value, name=name))

    def as_dict(self) -> dict[str, int]:
        """``{"t": ..., "y": ..., "x": ...}``."""
        return dict(self._asdict())

    def text(self) -> str:
        """``"32,64,64"``, as the command line writes it."""
        return ",".join(str(v) for v in self)


#: A processing block (t, y, x): the same value type as a patch.
Block = Patch


class Span(NamedTuple):
    """Indices ``start:stop`` along one axis (``stop`` excluded; ``None``: to the end).

    :meth:`parse` reads what users write: ``"100:200"``, ``"7"`` (that one index), ``":50"``,
    ``"10:"``, a pair or an int.
    """

    start: int
    stop: int | None

    @classmethod
    def parse(cls, value: Any, *, name: str) -> Span:
        """Read a span; a bad one raises :class:`ConfigError` naming ``name``."""
        if isinstance(value, cls):
            return value
        try:
            if isinstance(value, int) and not isinstance(value, bool):
                start, stop = value, value + 1
            elif isinstance(value, str) and ":" not in value:
                start = int(value.strip())
                stop = start + 1
            elif isinstance(value, str):
                first, _, last = value.strip().partition(":")
                start = int(first) if first.strip() else 0
                stop = int(last) if last.strip() else None
            else:
                first, last = value
                start, stop = int(first or 0), None if last is None else int(last)
        except (TypeError, ValueError):
            start, stop = -1, None
        if start < 0 or (stop is not None and stop <= start):
            raise ConfigError(
                flag(name),
                f"{value!r} is not a range START:STOP of indices (0 <= START < STOP)",
                f"write it as {flag(name)} 100:200 (STOP excluded), {flag(name)} 7 for one "
                "index, or leave out an end",
            )
        return cls(start, stop)

    def bounds(self, length: int) -> tuple[int, int]:
        """``(start, stop)`` within an axis of ``length``; ``ValueError`` if it falls outside."""
        stop = length if self.stop is None else self.stop
        if self.start >= length or stop > length:
            raise ValueError(f"{self.text()} is outside the axis (indices 0 to {length - 1})")
        return self.start, stop

    def text(self) -> str:
        """``"100:200"`` (or ``"100:"``), as the command line writes it."""
        return f"{self.start}:{'' if self.stop is None else self.stop}"


def parse_compression(value: Any) -> int:
    """The output's compression: ``"none"`` (0) or a blosc-zstd level 1 to 9.

    Raises
    ------
    ConfigError
        Naming ``compression``.
    """
    text = str(value).strip().lower()
    level = 0 if text in {"none", "0", "false", "off"} else None
    if level is None and text.isdigit() and 1 <= int(text) <= 9:
        level = int(text)
    if level is None:
        raise ConfigError(
            flag("compression"),
            f"{value!r} is not a compression level",
            "give a blosc-zstd level from 1 (fast) to 9 (small), or none",
        )
    return level


def parse_triple(value: Any, *, name: str = "patch") -> tuple[int, int, int]:
    """Parse ``"32,64,64"``, a sequence or a t/y/x mapping into three positive integers.

    Raises
    ------
    ConfigError
        Naming ``name``, unless the value holds exactly three positive integers.
    """
    parts: Any
    if isinstance(value, str):
        parts = value.replace(" ", "").strip("()[]").split(",")
    elif isinstance(value, Mapping):
        parts = [value.get(a) for a in ("t", "y", "x")] if set(value) == {"t", "y", "x"} else []
    else:
        parts = value
    try:
        numbers = tuple(int(p) for p in parts)
        exact = all(int(p) == float(p) for p in parts)
    except (TypeError, ValueError):
        numbers, exact = (), False
    if len(numbers) != 3 or not exact or min(numbers) < 1:
        raise ConfigError(
            flag(name),
            f"{value!r} is not three positive integers T,Y,X",
            f"write it as T,Y,X, for example {flag(name)} 32,64,64",
        )
    return numbers  # type: ignore[return-value]


def check_overlap(overlap: float) -> float:
    """The one check of a patch overlap: a fraction in ``[0, MAX_OVERLAP]``.

    Raises
    ------
    ConfigError
        Naming ``overlap``.
    """
    value = float(overlap)
    if not 0.0 <= value <= MAX_OVERLAP:
        raise ConfigError(
            flag("overlap"),
            f"{overlap!r} is outside [0, {MAX_OVERLAP}]",
            f"use a fraction such as {DEFAULT_OVERLAP} (larger overlaps cost more; srdvol info "
            "shows how much)",
        )
    return value


def check_model_patch_t(patch: Patch) -> Patch:
    """The one check that a patch fits the network: patch_t a multiple of 16.

    Raises
    ------
    ConfigError
        Naming ``patch``.
    """
    if patch.t % FRAMES_PER_LEVEL:
        fit = max(FRAMES_PER_LEVEL, round(patch.t / FRAMES_PER_LEVEL) * FRAMES_PER_LEVEL)
        raise ConfigError(
            flag("patch"),
            f"patch_t {patch.t} is not a multiple of {FRAMES_PER_LEVEL} (the network halves t "
            "four times)",
            f"use {fit},{patch.y},{patch.x}",
        )
    return patch


# ------------------------------------------------------------------------------ GPUs

#: What ``gpus=`` accepts: ``None``/"auto" (GPUs when present), "all", "none", or a list of
#: GPUs, each a position among the visible GPUs (int) or a device id as listed there (str).
GPUChoice = Literal["auto", "all", "none"] | Sequence[int | str] | None

#: How CUDA_VISIBLE_DEVICES names a device other than by index: a GPU UUID or a MIG instance.
DEVICE_PREFIXES = ("GPU-", "MIG-")


def parse_gpus(text: Any) -> GPUChoice:
    """Read a GPU choice: ``auto``, ``all``, ``none`` or a comma-separated list.

    Each list entry is a position in the visible list (``0,1``: the first two GPUs that
    ``CUDA_VISIBLE_DEVICES`` shows, as CUDA numbers them inside the process) or a device id as
    ``CUDA_VISIBLE_DEVICES`` writes it (``GPU-<uuid>``, ``MIG-<uuid>``);
    :func:`srdvol.dask.cluster.resolve_gpus` checks that they are visible.

    Returns
    -------
    None, str or list of int and str
        ``None`` for no text, the keyword, or the entries (positions as int, ids as str).

    Raises
    ------
    ConfigError
        Naming ``gpus``, if the text is none of these.
    """
    if text is None:
        return None
    if not isinstance(text, str):  # already parsed (a list)
        text = ",".join(str(v) for v in text)
    value = text.strip()
    if value.lower() in ("auto", "all", "none"):
        return value.lower()  # type: ignore[return-value]
    entries: list[int | str] = []
    for part in (p.strip() for p in value.split(",")):
        if part.isdigit():
            entries.append(int(part))
        elif part.startswith(DEVICE_PREFIXES) and len(part) > 4:
            entries.append(part)
        else:
            entries = []
            break
    if not entries:
        raise ConfigError(
            flag("gpus"),
            f"{text!r} is not a GPU choice",
            "give auto, all, none, positions in the visible GPU list such as 0,1, or device "
            "ids such as GPU-<uuid>",
        )
    return entries


def default_anchor(guide: int, restore: int = 0) -> float:
    """``--anchor``'s default: 0 with ``--restore`` (which puts the amplitudes back itself),
    :data:`GUIDED_ANCHOR` with ``--guide``, else :data:`DEFAULT_ANCHOR`."""
    if restore:
        return 0.0
    return GUIDED_ANCHOR if guide else DEFAULT_ANCHOR
